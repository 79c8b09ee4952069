"""Families whose timm models have no stock transformers counterpart: DeiT-III, SigLIP and EVA02.

Each is a record only: how it is recognised, what its card says, its planted fixture if it has one.
"""

from __future__ import annotations

from .base import ABSOLUTE_POSITIONS_NOTE, Family

DEIT3_BIBTEX = """@inproceedings{touvron2022deit3,
  title         = {{DeiT III}: Revenge of the {ViT}},
  author        = {Touvron, Hugo and Cord, Matthieu and J{\\'e}gou, Herv{\\'e}},
  booktitle     = {European Conference on Computer Vision (ECCV)},
  year          = {2022},
  eprint        = {2204.07118},
  archivePrefix = {arXiv}
}"""
SIGLIP_BIBTEX = """@inproceedings{zhai2023siglip,
  title         = {Sigmoid Loss for Language Image Pre-Training},
  author        = {Zhai, Xiaohua and Mustafa, Basil and Kolesnikov, Alexander and Beyer, Lucas},
  booktitle     = {International Conference on Computer Vision (ICCV)},
  year          = {2023},
  eprint        = {2303.15343},
  archivePrefix = {arXiv}
}"""
EVA02_BIBTEX = """@article{fang2024eva02,
  title         = {{EVA-02}: A Visual Representation for Neon Genesis},
  author        = {Fang, Yuxin and Sun, Quan and Wang, Xinggang and Huang, Tiejun and Wang, Xinlong and Cao, Yue},
  journal       = {Image and Vision Computing},
  year          = {2024},
  eprint        = {2303.11331},
  archivePrefix = {arXiv}
}"""

DEIT3 = Family(
    key="deit3",
    name="DeiT-III",
    tag="deit3",
    architectures=("deit3_*",),
    license="apache-2.0",
    license_note="DeiT-III's license (Apache-2.0)",
    bibtex=DEIT3_BIBTEX,
    interpolation_note=ABSOLUTE_POSITIONS_NOTE,
    default_resolution=224,
    planted=("planted-deit3",),
)
SIGLIP = Family(
    key="siglip",
    name="SigLIP",
    tag="siglip",
    architectures=("vit_*_siglip*",),
    license="apache-2.0",
    license_note="SigLIP's license (Apache-2.0)",
    bibtex=SIGLIP_BIBTEX,
    interpolation_note=ABSOLUTE_POSITIONS_NOTE,
    default_resolution=224,
    class_token=False,
)
EVA02 = Family(
    key="eva02",
    name="EVA02",
    tag="eva02",
    architectures=("eva02_*",),
    license="mit",
    license_note="EVA02's license (MIT)",
    bibtex=EVA02_BIBTEX,
    interpolation_note="EVA02 resamples its absolute position embedding and RoPE grid for other sizes. "
    + ABSOLUTE_POSITIONS_NOTE,
    default_resolution=224,
)
