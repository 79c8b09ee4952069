"""What a stranger can get out of the viewer's HTTP API (``sinder_hub.app``, gradio's ``/gradio_api/call``).

The viewer must read only files that reached gradio's upload folder (or its own samples):
every other path in an image payload, whether missing, a folder, empty, unreadable or a
private picture, gets the same fixed message and no picture. The app under test runs on
127.0.0.1 with ``GRADIO_TEMP_DIR`` set to a folder of the test's own.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

gradio = pytest.importorskip("gradio", reason="the viewer needs the app extra: pip install -e '.[app]'")
httpx = pytest.importorskip("httpx", reason="gradio's HTTP client library")

from sinder_hub.app import NOT_AN_UPLOAD, build_app, readable_upload  # noqa: E402
from sinder_hub.data import sample_images  # noqa: E402

FILE_META = {"_type": "gradio.FileData"}


def test_readable_upload_refuses_every_path_outside_the_folders_alike(tmp_path):
    uploads, private = tmp_path / "uploads", tmp_path / "private"
    (uploads / "sub").mkdir(parents=True)
    private.mkdir()
    (uploads / "sub" / "photo.png").write_bytes(b"a picture")
    (uploads / "empty.png").write_bytes(b"")
    (private / "secret.png").write_bytes(b"a private picture")
    (uploads / "link.png").symlink_to(private / "secret.png")
    (uploads / "inner-link.png").symlink_to(uploads / "sub" / "photo.png")
    (uploads / "loop.png").symlink_to(uploads / "loop.png")
    (uploads / "folder-link").symlink_to(private, target_is_directory=True)
    os.mkfifo(uploads / "pipe.png")  # not a regular file: opening it would wait for a writer
    folders = [uploads.resolve()]

    assert readable_upload(uploads / "sub" / "photo.png", folders) == (uploads / "sub" / "photo.png").resolve()
    assert readable_upload(uploads / "sub" / ".." / "empty.png", folders) == (uploads / "empty.png").resolve()
    assert readable_upload(uploads / "inner-link.png", folders) == (uploads / "sub" / "photo.png").resolve()
    for path in (
        private / "secret.png",
        uploads / ".." / "private" / "secret.png",
        uploads / "link.png",
        uploads / "folder-link" / "secret.png",
        uploads / "loop.png",
        uploads / "pipe.png",
        uploads / "missing.png",
        uploads,
        uploads / "sub",
        "",
        "photo.png\0",
    ):
        assert readable_upload(path, folders) is None, path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(base URL, upload folder, HTTP client)`` of a running planted-swiglu viewer with its own upload folder."""
    uploads = tmp_path_factory.mktemp("gradio-uploads")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(uploads))
        app = build_app(models=["planted-swiglu"])
        app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
        try:
            with httpx.Client(base_url=app.local_url, trust_env=False, timeout=120) as client:
                yield client, uploads.resolve()
        finally:
            app.close()


def call(client, endpoint: str, *data) -> tuple[str, object]:
    """One call of ``/gradio_api/call/<endpoint>``: the last server-sent ``(event, data)`` of its answer."""
    posted = client.post(f"gradio_api/call/{endpoint}", json={"data": list(data)})
    posted.raise_for_status()
    stream = client.get(f"gradio_api/call/{endpoint}/{posted.json()['event_id']}").text
    events = [line.removeprefix("event: ") for line in stream.splitlines() if line.startswith("event: ")]
    payloads = [line.removeprefix("data: ") for line in stream.splitlines() if line.startswith("data: ")]
    return events[-1], json.loads(payloads[-1])


def pictures(data) -> list:
    """The picture values of a ``respond`` answer: the chart and every column's two images."""
    return [data[2], *(update["value"] for update in data[3:])]


@pytest.mark.slow
def test_api_reads_only_uploads_and_answers_every_other_path_alike(served, tmp_path):
    client, uploads = served
    private = tmp_path / "private"
    (private / "folder").mkdir(parents=True)
    sample_images(["astronaut"])["astronaut"].save(private / "secret.png")
    (private / "empty.png").write_bytes(b"")
    sample_images(["coins"])["coins"].save(private / "unreadable.png")
    (private / "unreadable.png").chmod(0)
    link = uploads / "planted" / "secret.png"
    link.parent.mkdir()
    link.symlink_to(private / "secret.png")
    strangers = [
        private / "secret.png",
        private / "missing.png",
        private / "folder",
        private / "empty.png",
        private / "unreadable.png",
        f"{uploads}/{os.path.relpath(private / 'secret.png', uploads)}",  # up and out with ..
        link,
    ]
    answers = set()
    for path in strangers:  # without gradio's file marker, the payload reaches the viewer as it is
        event, data = call(client, "respond", {"path": str(path)}, 224, 4)
        assert (event, data[:2]) == ("complete", [NOT_AN_UPLOAD, ""]), path
        assert pictures(data) == [None] * 3, path
        answers.add(json.dumps(data))
    assert len(answers) == 1  # nothing in the answer tells the cases apart
    marked = {json.dumps(call(client, "respond", {"path": str(path), "meta": FILE_META}, 224, 4)) for path in strangers}
    assert marked == {json.dumps(["error", {"error": None}])}  # gradio's own refusal: one answer too

    photo = tmp_path / "astronaut.jpg"
    sample_images(["astronaut"])["astronaut"].resize((320, 300)).save(photo, quality=92)
    with photo.open("rb") as file:
        (uploaded,) = client.post("gradio_api/upload", files={"files": ("astronaut.jpg", file, "image/jpeg")}).json()
    assert Path(uploaded).resolve().is_relative_to(uploads)
    for payload in ({"path": uploaded, "meta": FILE_META, "orig_name": "astronaut.jpg"}, {"path": uploaded}):
        event, data = call(client, "respond", payload, 112, 4)
        assert event == "complete" and data[0].startswith("`astronaut.jpg`: 320×300 px, centre crop at 112 px")
        assert all(picture is not None for picture in pictures(data))
    (empty,) = client.post("gradio_api/upload", files={"files": ("empty.png", b"", "image/png")}).json()
    assert call(client, "respond", {"path": empty, "meta": FILE_META}, 224, 4)[1][0] == (
        "**Error:** empty.png is empty (0 bytes)"
    )
    assert call(client, "sample", "../../private/secret")[0] == "error"


@pytest.mark.slow
def test_page_sends_no_analytics_and_loads_no_web_fonts(served):
    client, _ = served
    assert client.get("config").json()["analytics_enabled"] is False
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    page, theme = client.get("").text, client.get("theme.css").text
    assert "sinder-hub viewer" in page and ":root" in theme
    for text in (page, theme):
        assert "fonts.googleapis.com" not in text and "fonts.gstatic.com" not in text
    assert "@font-face" not in theme and "system-ui" in theme
