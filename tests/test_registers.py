"""Test-time registers (sinder_hub.registers, sinder_hub.registers_search): the edit against a hand-written
reference of the authors' step 2, its removal, the neuron search on hand-built activations, and the
planted-defect fixtures end to end."""

import copy
import importlib.util
import math
import threading
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import GluMlp, Mlp, apply_rot_embed_cat
from timm.models.eva import Eva, EvaBlock
from tiny import tiny_vit

from sinder_hub.data import HELD_OUT_SAMPLES, TRAIN_SAMPLES, sample_images, sinder_transform
from sinder_hub.errors import BackboneError, InputError
from sinder_hub.planted import PLANTED_BLOCK, PLANTED_VARIANTS, planted_backbone
from sinder_hub.registers import (
    RegisterNeuron,
    TestTimeRegisters,
    apply_test_time_registers,
    defect_directions,
    held_out_comparison,
    registered_hidden,
    registers_of,
    remove_test_time_registers,
)
from sinder_hub.registers_search import (
    emergence_block,
    find_register_neurons,
    image_neuron_scores,
    published_config,
    standout_count,
    threshold_between,
)
from sinder_hub.tokens import block_outputs

CHOSEN = {0: [3, 7, 11], 2: [0, 5]}  # two layers of a 3-block model
BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench_registers_unseen.py"


def tiny_timm(architecture, **kwargs):
    """A small random ``architecture`` (a 4x4 grid of 16-px patches) with non-trivial weights."""
    torch.manual_seed(0)
    model = timm.create_model(architecture, pretrained=False, img_size=64, dynamic_img_size=True, **kwargs)
    _randomise(model)
    return model.eval()


def tiny_eva():
    """A 2-block DINOv3 (Eva: RoPE, class token + 4 storage tokens)."""
    return tiny_timm("vit_small_patch16_dinov3", depth=2, embed_dim=64, num_heads=2)


def tiny_clip():
    """A 3-block CLIP (QuickGELU, ``norm_pre`` before block 0, no layer scale)."""
    return tiny_timm("vit_base_patch16_clip_quickgelu_224", depth=3, embed_dim=32, num_heads=2, num_classes=0)


def _randomise(model):
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.copy_(1.0 + 0.3 * torch.randn_like(parameter))
            elif parameter.dim() >= 2:
                parameter.normal_(0, 0.2)
            else:
                parameter.normal_(0, 0.05)


def swiglu_with_negative_peaks():
    """``tiny_vit(mlp="swiglu")`` with the value halves of the chosen units negated: their largest-magnitude
    activations are then negative, and the register must keep the sign."""
    model = tiny_vit(mlp="swiglu")
    with torch.no_grad():
        for block in model.blocks:
            hidden = block.mlp.fc2.weight.shape[1]
            rows = [hidden + unit for units in CHOSEN.values() for unit in units]
            block.mlp.fc1.weight[rows] *= -1
            block.mlp.fc1.bias[rows] *= -1
    return model


MODELS = {
    "gelu": lambda: tiny_vit(),
    "swiglu": swiglu_with_negative_peaks,
    "registers": lambda: tiny_vit(reg_tokens=4),
    "clip": tiny_clip,
    "eva": tiny_eva,
}


def random_images(model, count, seed=1):
    """``[count, 3, R, R]`` standard-normal images of a 4x4 patch grid."""
    side = 4 * model.patch_embed.patch_size[0]
    return torch.randn(count, 3, side, side, generator=torch.Generator().manual_seed(seed))


def hand_registers(chosen=CHOSEN) -> TestTimeRegisters:
    neurons = tuple(RegisterNeuron(layer, unit) for layer, units in chosen.items() for unit in units)
    return TestTimeRegisters(base_model="tiny", base_sha256=None, neurons=neurons)


# ----------------------------------------------------------------------------------------
# The reference: the authors' step 2, the register appended at the END, blocks run by hand


def reference_attention(attn, x, rope, prefix):
    """Multi-head self-attention over ``[B, T, D]`` whose last token is the register; RoPE (if any) rotates
    the patch tokens only (positions ``prefix`` to ``T - 2``)."""
    B, T, D = x.shape
    q, k, v = attn.qkv(x).reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        half = getattr(attn, "rotate_half", False)

        def rotate(t):
            patches = apply_rot_embed_cat(t[:, :, prefix:-1], rope, half=half)
            return torch.cat([t[:, :, :prefix], patches, t[:, :, -1:]], dim=2)

        q, k = rotate(q), rotate(k)
    weights = (q @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(B, T, D))


def reference_hidden(mlp, y):
    """The input of ``mlp.fc2`` for ``y`` ``[B, T, D]``."""
    if type(mlp) is Mlp:
        return mlp.norm(mlp.act(mlp.fc1(y)))
    assert isinstance(mlp, GluMlp) and not mlp.gate_last
    gate, value = mlp.fc1(y).chunk(2, dim=-1)
    return mlp.norm(mlp.act(gate) * value)


def reference_edit(hidden, units, prefix):
    """Step 2, one image at a time: the register is the last token, patches are ``prefix`` to ``T - 2``."""
    hidden = hidden.clone()
    for b in range(hidden.shape[0]):
        values = hidden[b][:, units]  # [T, k], the register included
        peak = values.flatten()[values.abs().flatten().argmax()]
        for unit in units:
            hidden[b, prefix:-1, unit] = 0.0
            hidden[b, -1, unit] = peak
    return hidden


def reference_block(block, x, rope, prefix, units):
    if isinstance(block, EvaBlock):
        scale1, scale2 = ((lambda t, g=g: t if g is None else t * g) for g in (block.gamma_1, block.gamma_2))
    else:
        scale1, scale2 = block.ls1, block.ls2
    x = x + scale1(reference_attention(block.attn, block.norm1(x), rope, prefix))
    hidden = reference_hidden(block.mlp, block.norm2(x))
    if units:
        hidden = reference_edit(hidden, units, prefix)
    return x + scale2(block.mlp.fc2(hidden))


def reference_outputs(model, images, chosen=CHOSEN):
    """Block outputs (register dropped) and final features of the authors' recipe on the unedited model."""
    prefix = model.num_prefix_tokens
    x = model.patch_embed(images)
    if isinstance(model, Eva):
        x, rope = type(model)._pos_embed(model, x)
    else:
        x, rope = model.patch_drop(type(model)._pos_embed(model, x)), None
    x = model.norm_pre(torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[2])], dim=1))
    outputs = []
    for index, block in enumerate(model.blocks):
        x = reference_block(block, x, rope, prefix, chosen.get(index, []))
        outputs.append(x[:, :-1])
    return outputs, model.norm(x[:, :-1])


@pytest.mark.parametrize("kind", list(MODELS))
def test_edit_matches_the_reference_appending_the_register_at_the_end(kind):
    model = MODELS[kind]().double()
    chosen = {0: CHOSEN[0], len(model.blocks) - 1: CHOSEN[2]}
    images = random_images(model, 3).double()
    with torch.no_grad():
        original = model.forward_features(images)
        expected_blocks, expected = reference_outputs(model, images, chosen)
        apply_test_time_registers(model, hand_registers(chosen))
        features = model.forward_features(images)
        blocks = block_outputs(model, images)
    assert features.shape == original.shape
    assert (features - original).abs().max() > 1e-3  # the edit changes something
    assert torch.allclose(features, expected, rtol=0, atol=1e-12)
    for got, want in zip(blocks, expected_blocks):
        assert torch.allclose(got, want, rtol=0, atol=1e-12)
    # every image of the batch gets its own peak: the first image alone gives its own row of the batch
    with torch.no_grad():
        assert torch.allclose(model.forward_features(images[:1]), features[:1], rtol=0, atol=1e-12)


def test_registered_hidden_known_answer():
    # one image, tokens: class, register, three patches; neurons 0..3, chosen 1 and 3
    hidden = torch.tensor(
        [
            [
                [1.0, 2.0, 3.0, 4.0],  # class token: untouched
                [0.0, 0.5, 0.0, 0.1],  # register
                [1.0, -9.0, 1.0, 2.0],  # the peak (-9) is a patch's, negative
                [1.0, 3.0, 1.0, -4.0],
                [1.0, 0.0, 1.0, 8.5],
            ]
        ]
    )
    edited = registered_hidden(hidden, torch.tensor([1, 3]), position=1)
    expected = hidden.clone()
    expected[0, 1, [1, 3]] = -9.0
    expected[0, 2:, 1] = 0.0
    expected[0, 2:, 3] = 0.0
    assert torch.equal(edited, expected)
    assert hidden[0, 2, 1] == -9.0  # the caller's tensor is not edited in place


def _all_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("kind", ["registers", "eva"])
def test_removing_the_edit_restores_the_model_exactly(kind):
    model = MODELS[kind]()
    images = random_images(model, 2)
    with torch.no_grad():
        original, original_blocks = model.forward_features(images), block_outputs(model, images)
        final, intermediates = model.forward_intermediates(images)
        state = {name: value.clone() for name, value in model.state_dict().items()}
        prefix_counts = [getattr(block.attn, "num_prefix_tokens", None) for block in model.blocks]
        hooks = _all_hooks(model)
        assert apply_test_time_registers(model, hand_registers({0: [1, 2], 1: [4]})) is model
        assert registers_of(model).neurons[0] == RegisterNeuron(0, 1)
        assert model.num_prefix_tokens == {"registers": 5, "eva": 5}[kind]  # still the base model's
        edited_final, edited_intermediates = model.forward_intermediates(images)
        edited_blocks = block_outputs(model, images)
        assert edited_final.shape == final.shape
        assert [t.shape for t in edited_intermediates] == [t.shape for t in intermediates]
        assert not torch.allclose(edited_final, final)
        # the intermediates are the edited block outputs' patch tokens
        prefix = model.num_prefix_tokens
        assert torch.allclose(edited_intermediates[-1].flatten(2).transpose(1, 2), edited_blocks[-1][:, prefix:])
        assert model(images).shape == torch.Size([2, model.num_features])
        assert remove_test_time_registers(model) is model
        assert registers_of(model) is None and "_pos_embed" not in vars(model)
        assert _all_hooks(model) == hooks
        assert [getattr(block.attn, "num_prefix_tokens", None) for block in model.blocks] == prefix_counts
        assert torch.equal(model.forward_features(images), original)
        assert all(torch.equal(a, b) for a, b in zip(block_outputs(model, images), original_blocks))
    assert all(torch.equal(state[name], value) for name, value in model.state_dict().items())


def test_a_block_called_without_the_register_is_left_alone():
    model = tiny_vit()
    images = random_images(model, 2)
    with torch.no_grad():
        tokens = block_outputs(model, images)[0]
        plain = model.blocks[1](tokens)
        apply_test_time_registers(model, hand_registers({1: [0, 1, 2]}))
        model.forward_features(images)  # leaves the per-thread state after the last block
        assert torch.equal(model.blocks[1](tokens), plain)
        model.patch_embed(images)
        assert torch.equal(model.blocks[1](tokens), plain)


def test_concurrent_forwards_in_threads_do_not_mix():
    model = apply_test_time_registers(tiny_eva(), hand_registers({0: [1, 2], 1: [4]}))
    inputs = [random_images(model, 3, seed=1), random_images(model, 1, seed=2), random_images(model, 2, seed=3)]
    with torch.no_grad():
        expected = [model.forward_features(images) for images in inputs]
    failures = []

    def work(index):
        try:
            with torch.no_grad():
                for _ in range(15):
                    if not torch.equal(model.forward_features(inputs[index]), expected[index]):
                        failures.append(index)
        except Exception as error:  # a mixed-up register shows as a shape error in another thread
            failures.append(repr(error))

    threads = [threading.Thread(target=work, args=(index,)) for index in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_a_deep_copy_carries_its_own_edit():
    model = apply_test_time_registers(tiny_vit(reg_tokens=4), hand_registers({0: [1], 2: [3]}))
    images = random_images(model, 2)
    with torch.no_grad():
        edited = model.forward_features(images)
        copied = copy.deepcopy(model)
        assert torch.equal(copied.forward_features(images), edited)
        remove_test_time_registers(copied)
        assert torch.equal(model.forward_features(images), edited)
        assert torch.equal(copied.forward_features(images), remove_test_time_registers(model).forward_features(images))


def test_edit_refusals():
    model = tiny_vit()
    with pytest.raises(BackboneError, match="carries no test-time registers"):
        remove_test_time_registers(model)
    with pytest.raises(InputError, match=r"register neuron 1:128: blocks.1.mlp.fc2 has 128 input units"):
        apply_test_time_registers(model, hand_registers({1: [128]}))
    with pytest.raises(InputError, match="layer 3: the model has blocks 0 to 2"):
        apply_test_time_registers(model, hand_registers({3: [0]}))
    assert registers_of(model) is None and _all_hooks(model) == 0
    apply_test_time_registers(model, hand_registers())
    with pytest.raises(BackboneError, match="already carries test-time registers"):
        apply_test_time_registers(model, hand_registers())


# ----------------------------------------------------------------------------------------
# The search


def test_neuron_scores_on_hand_built_activations():
    # two images of 6 tokens, 5 neurons; image 0 has outliers at tokens 1 and 4, image 1 has none
    hidden = torch.zeros(2, 6, 5)
    outliers = torch.zeros(2, 6, dtype=torch.bool)
    outliers[0, [1, 4]] = True
    hidden[:, :, 0] = 0.1
    hidden[0, [1, 4], 0] = 8.0  # sparse, large at the outliers
    hidden[:, :, 1] = 10.0  # dense: large everywhere, the filter rejects it
    hidden[:, :, 2] = -0.2
    hidden[0, [1, 4], 2] = torch.tensor([-9.0, -11.0])  # sparse and negative: the winner (magnitude 10)
    hidden[:, :, 3] = -3.0  # dense and negative: rejected as well
    hidden[0, :3, 4] = 0.4  # quiet on exactly half the tokens: still counts
    hidden[0, 3:, 4] = 6.0
    scores = image_neuron_scores(hidden, outliers)
    assert torch.allclose(scores[0], torch.tensor([8.0, 0.0, 10.0, 0.0, 3.2], dtype=torch.float64))
    assert torch.equal(scores[1], torch.zeros(5, dtype=torch.float64))  # no outliers, no score
    unfiltered = image_neuron_scores(hidden, outliers, sparsity_filter=False)
    assert torch.allclose(unfiltered[0], torch.tensor([8.0, 10.0, 10.0, 3.0, 3.2], dtype=torch.float64))
    assert int(scores[0].argmax()) == 2


def test_derived_defaults_on_known_figures():
    threshold, ratio = threshold_between(torch.tensor([400.0, 500.0, 600.0]), torch.tensor([40.0, 50.0, 60.0]), "x")
    assert threshold == pytest.approx(math.sqrt(500 * 50)) and ratio == pytest.approx(10.0)
    with pytest.raises(InputError, match=r"x: the defects' median norm is 1.50x"):
        threshold_between(torch.tensor([75.0]), torch.tensor([50.0]), "x")
    with pytest.raises(InputError, match="x: eq. 5 flags no defect"):
        threshold_between(torch.tensor([]), torch.tensor([50.0]), "x")
    assert emergence_block(torch.tensor([0.0, 0.1, 0.4, 2.5, 2.0, 2.6])) == 3  # first >= half of 2.6
    assert standout_count(torch.tensor([100.0, 90.0, 1.0, 0.9, 0.8])) == (2, pytest.approx(90.0))
    assert standout_count(torch.tensor([5.0, 4.0, 3.0, 0.0, 0.0]))[0] == 3  # a drop to 0 is the largest
    assert standout_count(torch.cat([torch.full((50,), 100.0), torch.ones(10)])) == (50, pytest.approx(100.0))
    assert standout_count(torch.cat([torch.full((50,), 100.0), torch.ones(10)]), cap=10)[0] <= 10
    with pytest.raises(InputError, match="every neuron scored 0"):
        standout_count(torch.zeros(4))


def _hand_scores(model, images, threshold, highest):
    """Mean filtered scores per layer over the images with outliers, written out image by image."""
    captured = {}
    handles = [
        model.blocks[layer].mlp.fc2.register_forward_pre_hook(
            lambda module, args, layer=layer: captured.__setitem__(layer, args[0])
        )
        for layer in range(highest + 1)
    ]
    norms = block_outputs(model, images)[-1].norm(dim=-1)
    for handle in handles:
        handle.remove()
    totals, used = [torch.zeros(captured[0].shape[-1], dtype=torch.float64) for _ in captured], 0
    for image in range(len(images)):
        outliers = norms[image] > threshold
        if not outliers.any():
            continue
        used += 1
        for layer, hidden in captured.items():
            activations = hidden[image].double()
            score = activations[outliers].abs().mean(dim=0)
            dense = (activations.abs() < 0.5).double().mean(dim=0) < 0.5
            score[dense] = 0.0
            totals[layer] += score
    return [total / used for total in totals], norms


def test_search_end_to_end_matches_a_hand_computation():
    model = tiny_vit().double()
    images = random_images(model, 5).double()
    with torch.no_grad():
        maxima = block_outputs(model, images[:4])[-1].norm(dim=-1).amax(dim=1).sort().values
        threshold = float(maxima[:2].mean())  # one of the four images searched has no outlier
        expected, norms = _hand_scores(model, images[:4], threshold, highest=1)
    # item 1 is unreadable; the batch counts as two images; num_images=5 stops before the last image
    items = [images[0], None, images[1:3], images[3], images[4]]
    registers = find_register_neurons(
        model,
        items,
        base_model="tiny",
        seed=None,
        num_images=5,
        threshold=threshold,
        highest_layer=1,
        top_k=4,
        calibration_images=2,
    )
    flat = torch.cat(expected)
    order = flat.argsort(descending=True)[:4]
    hidden = expected[0].numel()
    assert [(n.layer, n.unit) for n in registers.neurons] == [(int(i) // hidden, int(i) % hidden) for i in order]
    assert [n.score for n in registers.neurons] == pytest.approx(flat[order].tolist(), rel=1e-9)
    seen = registers.images
    assert (seen.seen, seen.unreadable, seen.sample_indices) == (4, 1, (0, 1, 2, 3))
    assert list(seen.outliers_per_image) == (norms > threshold).sum(dim=1).tolist()
    assert seen.skipped == 1 and seen.used == 3 and seen.sizes == ((56, 56),)
    settings = registers.settings
    assert (settings.threshold, settings.highest_layer, settings.top_k) == (threshold, 1, 4)
    assert settings.threshold_source == settings.highest_layer_source == settings.top_k_source == "given"
    assert (settings.detection_block, settings.detection_block_source) == (2, "derived: the last block")
    assert settings.seed is None and settings.calibration_images == 3  # whole batches: image 0, then two
    assert TestTimeRegisters.from_json(registers.to_json()) == registers


def test_search_draws_a_seeded_sample_and_refuses_a_model_without_outliers():
    model = tiny_vit()
    images = random_images(model, 6)
    with torch.no_grad():
        threshold = float(block_outputs(model, images)[-1].norm(dim=-1).median())
    found = find_register_neurons(
        model, images, base_model="tiny", num_images=3, seed=7, threshold=threshold, highest_layer=0, top_k=2
    )
    assert found.images.sample_indices == tuple(
        torch.randperm(6, generator=torch.Generator().manual_seed(7))[:3].tolist()
    )
    assert found.settings.seed == 7 and found.images.seen == 3
    again = find_register_neurons(
        model, images, base_model="tiny", num_images=3, seed=7, threshold=threshold, highest_layer=0, top_k=2
    )
    assert again.neurons == found.neurons
    # a random tiny model has no high-norm outliers: no threshold can be derived from eq. 5
    with pytest.raises(InputError, match="threshold at block 2 on 6 calibration images"):
        find_register_neurons(model, images, base_model="tiny")
    apply_test_time_registers(model, found)
    with pytest.raises(InputError, match="already carries test-time registers"):
        find_register_neurons(model, images, base_model="tiny", threshold=threshold)


def test_published_configs_apply_to_exactly_the_published_models():
    with torch.device("meta"):
        dinov2 = timm.create_model("vit_large_patch14_dinov2", pretrained=False)
        clip = timm.create_model("vit_base_patch16_clip_224", pretrained=False)
        shallow_clip = timm.create_model("vit_base_patch16_clip_224", pretrained=False, depth=3)
        quickgelu = timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False)
    published = published_config(dinov2)
    assert (published.detection_block, published.threshold, published.highest_layer, published.top_k) == (
        22,
        150,
        17,
        50,
    )
    published = published_config(clip)
    assert (published.detection_block, published.threshold, published.highest_layer, published.top_k) == (11, 30, 5, 10)
    assert published_config(shallow_clip) is None and published_config(quickgelu) is None


def test_json_refusals():
    with pytest.raises(InputError, match="registers.json: schema version 99, this sinder-hub reads 1"):
        TestTimeRegisters.from_json('{"schema_version": 99}', "registers.json")
    with pytest.raises(InputError, match="registers.json: not valid JSON"):
        TestTimeRegisters.from_json("{", "registers.json")
    with pytest.raises(InputError, match="registers.json: missing or unexpected field"):
        TestTimeRegisters.from_json('{"schema_version": 1, "neurons": []}', "registers.json")
    hand = hand_registers()
    assert TestTimeRegisters.from_json(hand.to_json()) == hand


# ----------------------------------------------------------------------------------------
# The planted-defect fixtures, end to end


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(PLANTED_VARIANTS))
def test_planted_defects_are_moved_to_the_register(variant):
    model = planted_backbone(variant)
    directions = defect_directions(model)
    transform = sinder_transform(224)
    assert not set(TRAIN_SAMPLES) & set(HELD_OUT_SAMPLES)
    train = [transform(image) for image in sample_images(TRAIN_SAMPLES).values()]
    held_out = {name: transform(image) for name, image in sample_images(HELD_OUT_SAMPLES).items()}
    registers = find_register_neurons(model, train, base_model=variant, directions=directions)
    planted = model.blocks[PLANTED_BLOCK].mlp.fc2
    hidden = planted.weight.shape[1]
    assert {(PLANTED_BLOCK, hidden - 2), (PLANTED_BLOCK, hidden - 1)} <= {(n.layer, n.unit) for n in registers.neurons}
    report = held_out_comparison(model, registers, held_out, directions=directions)
    assert report.before.total >= len(held_out)
    assert report.defect_reduction >= 0.9
    assert report.normal_token_cosine >= 0.99
    # what is left is what eq. 5 flags with the trigger switched off: the fixture's floor
    floor = bench_tool().trigger_off_outputs(model, {n: image[None] for n, image in held_out.items()}, directions)
    assert report.after.total <= sum(output["defects"][-1] for output in floor.values())


def bench_tool():
    """``tools/bench_registers_unseen.py`` as a module (its photo sets and measures)."""
    spec = importlib.util.spec_from_file_location("bench_registers_unseen", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_planted_dinov3_registers_clear_the_defects_of_unseen_photos():
    """Issue #24 item 7, on photos that neither the search nor any other test uses (sample photos upside
    down, among them ones where eq. 5 flags content tokens once the planted defects are gone): at least 90 %
    of the defects the planted trigger makes are cleared, and what is left is, token for token and block
    for block, what eq. 5 flags in the same model with the trigger switched off; no patch token stays above
    the search's norm threshold, and the normal tokens barely move."""
    bench = bench_tool()
    model = planted_backbone("planted-dinov3")
    directions = defect_directions(model)
    transform = sinder_transform(224)
    train = [transform(image) for image in sample_images(TRAIN_SAMPLES).values()]
    registers = find_register_neurons(model, train, base_model="planted-dinov3", directions=directions)
    upside_down = bench.photo_sets()["vflip"]
    names = ("rocket", "retina", "coins", "camera", "astronaut")
    unseen = {name: transform(upside_down[f"{name}/vflip"])[None] for name in names}
    figures = bench.measure(model, registers, directions, unseen)
    clearable = figures["before"] - figures["floor"]
    assert figures["floor"] >= 1 and clearable >= len(unseen)  # a set where the floor is not trivially 0
    assert (figures["before"] - figures["after"]) / clearable >= 0.9
    assert figures["same_as_floor"] == len(unseen)
    assert figures["high_before"] >= len(unseen) and figures["high_after"] == 0
    assert figures["cosine_original"] >= 0.99 and figures["cosine_trigger_off"] >= figures["cosine_original"]
