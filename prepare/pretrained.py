"""Pretrained-weight import: a Hugging Face BERT (e.g. CXR-BERT, as the paper uses) into TextEncoder,
and timm-style ViT weights (a 2-D ImageNet ViT-B/16 inflated to 3-D, or a 3-D ViT with timm's block
names) into ViT3D. Every load reports what was loaded, what of ours stayed initialised (missing) and
what of theirs was not used (unexpected), each with the reason.

    python -m prepare.pretrained --bert DIR                  # DIR: config.json, model.safetensors or
                                                            #      pytorch_model.bin, vocab.txt
    python -m prepare.pretrained --vit FILE --preset paper   # FILE: .safetensors, .pth or .bin
    python -m prepare.pretrained --flip_of CT.nii.gz         # the --vit_flip for file-order weights

Files are read without extra dependencies: safetensors by its documented layout (8-byte little-endian
header length, JSON header, raw little-endian tensors), pickles with torch.load(weights_only=True).
"""
import argparse
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, models

from data import bert_tokenizer
from model import PRESETS, ModelConfig, TextEncoder, ViT3D, interpolate_table

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path) -> dict:
    """A .safetensors file -> {name: tensor} (copies; the file is read once)."""
    raw = Path(path).read_bytes()
    if len(raw) < 8:
        raise ValueError(f"{path}: too short to be a safetensors file")
    (n,) = struct.unpack("<Q", raw[:8])
    try:
        header = json.loads(raw[8:8 + n])
    except ValueError as e:
        raise ValueError(f"{path}: bad safetensors header ({e})") from None
    body, out = memoryview(raw)[8 + n:], {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
        begin, end = meta["data_offsets"]
        t = torch.frombuffer(bytearray(body[begin:end]), dtype=_ST_DTYPES[meta["dtype"]])
        out[name] = t.reshape(meta["shape"])
    return out


def read_weights(path) -> dict:
    """.safetensors, or a torch pickle (.bin/.pth/.pt; a 'state_dict' or 'model' entry is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    return sd


@dataclass
class LoadReport:
    source: str
    loaded: list = field(default_factory=list)       # our parameter names that were filled
    missing: dict = field(default_factory=dict)      # ours, left as initialised -> reason
    unexpected: dict = field(default_factory=dict)   # theirs, not used -> reason

    def summary(self) -> str:
        lines = [f"pretrained: {len(self.loaded)} tensors loaded from {self.source}"]
        for title, items in (("missing (kept initialised)", self.missing),
                             ("unexpected (not used)", self.unexpected)):
            groups = {}
            for name, why in items.items():
                groups.setdefault(why, []).append(name)
            for why, names in groups.items():
                shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
                lines.append(f"  {title}: {shown} -- {why}")
        return "\n".join(lines)


def _assign(module, mapped: dict, theirs: dict, report: LoadReport):
    """Copy mapped {our name: tensor} into module; shape mismatches are errors, naming both sides."""
    own = module.state_dict()
    for name, t in mapped.items():
        if tuple(t.shape) != tuple(own[name].shape):
            raise ValueError(f"{report.source}: {theirs[name]} has shape {tuple(t.shape)} but "
                             f"{type(module).__name__}.{name} is {tuple(own[name].shape)}; the "
                             f"weights are for another model size")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in mapped.items()}, strict=False)
    report.loaded = sorted(mapped)
    for name in own:
        if name not in mapped:
            report.missing.setdefault(name, "no counterpart in the source weights")


# ----------------------------------------------------------------------------- BERT -> TextEncoder

def load_tokenizer(path):
    """A tokenizer.json or a BERT vocab.txt (or a folder holding either), e.g. the vocabulary of
    the BERT that --text_weights loads."""
    path = Path(path)
    if path.is_dir():
        hits = [path / n for n in ("tokenizer.json", "vocab.txt") if (path / n).is_file()]
        if not hits:
            raise FileNotFoundError(f"{path}: holds neither tokenizer.json nor vocab.txt")
        path = hits[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    if path.suffix == ".json":
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a plain Exception on bad JSON
            raise ValueError(f"{path}: not a tokenizers JSON file ({e})") from e
    return bert_tokenizer(models.WordPiece.read_file(str(path)))


def bert_text_config(folder) -> dict:
    """config.json of a Hugging Face BERT -> the ModelConfig text fields it implies, the official
    pooling (sum over max_len) and the paper's zero-shot prompt ("There is {}"): a pretrained
    text encoder is read as the paper's was."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face BERT folder)")
    c = json.loads(path.read_text())
    if c.get("hidden_act", "gelu") != "gelu" or c.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{path}: TextEncoder implements BERT with exact GELU and absolute "
                         f"positions, not {c.get('hidden_act')} / {c.get('position_embedding_type')}")
    if abs(c.get("layer_norm_eps", 1e-12) - 1e-12) > 1e-15:
        raise ValueError(f"{path}: layer_norm_eps {c['layer_norm_eps']} (TextEncoder uses BERT's 1e-12)")
    return dict(text_width=c["hidden_size"], text_depth=c["num_hidden_layers"],
                text_heads=c["num_attention_heads"], text_mlp=c["intermediate_size"],
                vocab_size=c["vocab_size"], prompt=PRESETS["paper"].prompt,
                text_pool=PRESETS["paper"].text_pool)


_BERT_LAYER = {"attention.output.dense": "attn.proj", "attention.output.LayerNorm": "norm1",
               "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
               "output.LayerNorm": "norm2"}


def _bert_weights(folder) -> tuple:
    folder = Path(folder)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name, read_weights(folder / name)
    raise FileNotFoundError(f"{folder}: neither model.safetensors nor pytorch_model.bin")


def load_bert(text: TextEncoder, folder) -> LoadReport:
    """Fill text (a TextEncoder) from a BERT folder; returns the report. The head (BERT width ->
    embedding d) has no counterpart: it stays initialised, as in the paper."""
    path, sd = _bert_weights(folder)
    report = LoadReport(str(path))
    prefix = next((p for p in ("", "bert.", "model.", "encoder.")
                   if f"{p}embeddings.word_embeddings.weight" in sd), None)
    if prefix is None:
        raise ValueError(f"{path}: no BERT embeddings.word_embeddings.weight (under '', 'bert.', ...)")
    mapped, theirs, used = {}, {}, set()

    def put(ours, names, t=None):  # names: theirs, one or (for qkv) three
        names = [prefix + n for n in ([names] if isinstance(names, str) else names)]
        mapped[ours], theirs[ours] = sd[names[0]] if t is None else t, " + ".join(names)
        used.update(names)

    for ours, name in (("word_embeddings.weight", "embeddings.word_embeddings.weight"),
                       ("token_type_embeddings.weight", "embeddings.token_type_embeddings.weight"),
                       ("embed_norm.weight", "embeddings.LayerNorm.weight"),
                       ("embed_norm.bias", "embeddings.LayerNorm.bias")):
        put(ours, name)
    pos = sd[prefix + "embeddings.position_embeddings.weight"]
    if pos.shape[0] < text.cfg.max_len:
        raise ValueError(f"{path}: {pos.shape[0]} positions, the text encoder needs {text.cfg.max_len}")
    put("position_embeddings.weight", "embeddings.position_embeddings.weight", pos[:text.cfg.max_len])
    for i in range(text.cfg.text_depth):
        p = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):  # BERT's separate q, k, v -> our fused qkv, rows [q; k; v]
            names = [f"{p}attention.self.{n}.{kind}" for n in ("query", "key", "value")]
            missing = [prefix + n for n in names if prefix + n not in sd]
            if missing:
                raise ValueError(f"{path}: {missing[0]} not found: fewer than {text.cfg.text_depth} layers?")
            put(f"layers.{i}.attn.qkv.{kind}", names, torch.cat([sd[prefix + n] for n in names]))
            for src, dst in _BERT_LAYER.items():
                put(f"layers.{i}.{dst}.{kind}", f"{p}{src}.{kind}")
    for n in sd:
        if n not in used:
            layer = re.match(rf"{re.escape(prefix)}encoder\.layer\.(\d+)\.", n)
            report.unexpected[n] = ("layer beyond the configured depth" if layer else
                                    "index buffer, not a weight" if n.endswith("position_ids") else
                                    "pooler / pre-training head: not part of the text encoder")
    _assign(text, mapped, theirs, report)
    report.missing.update({k: "projection to the shared embedding space: trained from scratch"
                           for k in report.missing if k.startswith("head.")})
    return report


# ----------------------------------------------------------------------------- timm ViT -> ViT3D

def inflate_patch_embed(w2d: torch.Tensor, depth: int) -> torch.Tensor:
    """(C, 3, ph, pw) ImageNet patch kernel -> (C, 1, ph, pw, depth) for one-channel CT.

    RGB -> grey: summing the colour channels gives the response the 2-D model had to a grey image
    (equal R, G, B). 2-D -> 3-D (I3D-style): the kernel is repeated over the patch depth and divided
    by it, so a volume constant along z gives every token exactly the 2-D model's value.
    """
    grey = w2d.sum(1, keepdim=True)  # (C, 1, ph, pw)
    return grey[..., None].expand(*grey.shape, depth) / depth  # (C, 1, ph, pw, depth)


def position_table(t: torch.Tensor, base: tuple, path) -> torch.Tensor:
    """A checkpoint's pos_embed (1, 1 + N, C) -> our (1 + T0, C) for the base grid: as is when
    N = T0, else trilinearly resized from a cubic grid (the official load_weight does the same)."""
    t = t.reshape(-1, t.shape[-1])
    n = t.shape[0] - 1
    if n == math.prod(base):
        return t
    side = round(n ** (1 / 3))
    if side ** 3 != n:
        raise ValueError(f"{path}: pos_embed has {n} patch rows, neither the {base} grid "
                         f"({math.prod(base)} rows) nor a cube to interpolate from")
    return interpolate_table(t, (side,) * 3, base)


def flip_vit(mapped: dict, axes, base: tuple) -> dict:
    """Weights for volumes stored in the other voxel order along `axes` (0 = x, 1 = y, 2 = z).

    Flipping the patch kernel along an axis gives every patch of the flipped volume the embedding
    its mirror patch had, and flipping the position table's grid along it moves each position
    with its patch; the transformer sees the same set of tokens, so v is unchanged.
    """
    out = dict(mapped)
    if axes and "patch_embed.weight" in out:
        out["patch_embed.weight"] = out["patch_embed.weight"].flip([2 + a for a in axes])
    if axes and "pos_embed" in out:
        t = out["pos_embed"]
        grid = t[1:].reshape(*base, -1).flip(list(axes))
        out["pos_embed"] = torch.cat([t[:1], grid.reshape(-1, t.shape[-1])])
    return out


def load_vit(visual: ViT3D, path, flip=()) -> LoadReport:
    """Fill visual from timm-style weights (names as timm's VisionTransformer: patch_embed.proj,
    cls_token, pos_embed, blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm): a 2-D
    ImageNet ViT, or a 3-D one such as the official BrgSA starting point (M3AE's ViT-B 16x16x8,
    pos_embed (1, 1 + 14^3, 768)). flip: axes (0 = x, 1 = y, 2 = z) along which the weights'
    voxel order is the reverse of ours (see flip_vit)."""
    sd, report = read_weights(path), LoadReport(str(path))
    own = visual.state_dict()
    mapped, theirs = {}, {}
    for name, t in sd.items():
        ours = {"patch_embed.proj.weight": "patch_embed.weight",
                "patch_embed.proj.bias": "patch_embed.bias"}.get(name, name)
        if ours == "patch_embed.weight" and t.ndim == 4:
            if tuple(t.shape[2:]) != tuple(visual.cfg.patch_size[:2]):
                raise ValueError(f"{path}: 2-D patch {tuple(t.shape[2:])} does not match the in-plane "
                                 f"patch {tuple(visual.cfg.patch_size[:2])}")
            t = inflate_patch_embed(t, visual.cfg.patch_size[2])
        if name == "pos_embed" and "pos_embed" in own:
            mapped[name], theirs[name] = position_table(t, visual.base_grid, path), name
        elif name == "pos_embed":
            report.unexpected[name] = ("pos_embed='sincos': fixed positions rebuilt per grid "
                                       "(the paper preset's pos_embed='table' loads it)")
        elif name.startswith(("head.", "fc_norm.", "head_drop.")):
            report.unexpected[name] = "classifier of the source model: ViT3D.head is trained anew"
        elif ours in own and not ours.startswith("head."):
            mapped[ours], theirs[ours] = t, name
        else:
            report.unexpected[name] = "no counterpart in ViT3D (other architecture or deeper)"
    _assign(visual, flip_vit(mapped, tuple(flip), visual.base_grid), theirs, report)
    report.missing.update({k: "projection to the shared embedding space: trained from scratch"
                           for k in report.missing if k.startswith("head.")})
    if "input_mean" in report.missing:
        report.missing["input_mean"] = "the training set's mean volume: set by train.py from the data"
    return report


def file_order_flip(path) -> str:
    """The --vit_flip letters for volumes like this NIfTI: the axes our canonical (RAS) loading
    reverses. Weights trained on the files' own voxel order (the official code reads them with
    SimpleITK and never reorients) see our volumes correctly once flipped along these axes."""
    import nibabel as nib  # only this helper reads a volume
    ornt = nib.io_orientation(nib.load(str(path)).affine)  # (3, 2): RAS axis and sign per file axis
    if list(ornt[:, 0]) != [0, 1, 2]:
        raise ValueError(f"{path}: voxel axes are {''.join(nib.aff2axcodes(nib.load(str(path)).affine))}, "
                         f"a permutation of RAS; flipping the weights cannot express it")
    return "".join("xyz"[i] for i in range(3) if ornt[i, 1] < 0)


def parse_flip(text: str) -> tuple:
    """'xy' -> (0, 1): the --vit_flip axes as indices."""
    bad = set(text) - set("xyz")
    if bad:
        raise ValueError(f"--vit_flip takes letters from 'xyz', got {text!r}")
    return tuple("xyz".index(c) for c in sorted(set(text)))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bert", help="Hugging Face BERT folder to load into the text encoder "
                   "(default: %(default)s)")
    p.add_argument("--vit", help="timm-style ViT weights file to load into the image encoder "
                   "(default: %(default)s)")
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS),
                   help="model size to load into (default: %(default)s)")
    p.add_argument("--vit_flip", default="", type=parse_flip, help="axes (x, y, z) along which the "
                   "ViT weights' voxel order is reversed from ours, e.g. xy (default: none)")
    p.add_argument("--flip_of", help="a NIfTI of the data set: print the --vit_flip that makes "
                   "file-order weights (the official ones) see our RAS volumes right "
                   "(default: %(default)s)")
    a = p.parse_args()
    if a.flip_of:
        print(f"--vit_flip={file_order_flip(a.flip_of)}")
    if a.bert:
        cfg = ModelConfig(**{**PRESETS[a.preset].__dict__, **bert_text_config(a.bert)})
        print(load_bert(TextEncoder(cfg), a.bert).summary())
    if a.vit:
        print(load_vit(ViT3D(PRESETS[a.preset]), a.vit, a.vit_flip).summary())
