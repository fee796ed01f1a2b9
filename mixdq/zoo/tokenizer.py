"""Build the real CLIP BPE tokenizer files (vocab.json + merges.txt) offline.

No model hub is reachable here, but the CLIP BPE merge list ships inside installable
packages (open-clip-torch's ``bpe_simple_vocab_16e6.txt.gz``).  The tokenizer files that the
diffusers pipeline loads are derived from it exactly the way OpenAI's ``SimpleTokenizer``
builds its vocabulary, so ids match the reference CLIP tokenizer (49408 ids, BOS 49406,
EOS 49407).  This is a *dev-time* step: the generated files are shipped in
``assets/tiny-sdxl/tokenizer*``, so open-clip is not a runtime dependency.

    mixdq zoo tokenizer OUT_DIR [--bpe PATH]
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

VOCAB_SIZE = 49408
BOS_ID = 49406
EOS_ID = 49407
MAX_LENGTH = 77


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-unicode table of GPT-2/CLIP BPE (same order as the reference)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def find_bpe_file() -> Path:
    """Locate ``bpe_simple_vocab_16e6.txt.gz`` inside an installed open-clip-torch (no import
    of open_clip itself: its package __init__ pulls torchvision/timm)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "CLIP BPE file not found: `pip install open-clip-torch --no-deps` (dev-time only) "
            "or pass --bpe PATH to bpe_simple_vocab_16e6.txt.gz"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing from the installed open_clip")
    return path


def vocab_and_merges(bpe_path: Path) -> tuple[dict[str, int], list[str]]:
    """Replicates OpenAI CLIP's SimpleTokenizer.__init__ vocabulary construction."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    # The reference keeps exactly 49152 - 256 - 2 merges after the header line.
    merges = lines[1 : 49152 - 256 - 2 + 1]
    merge_pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(p) for p in merge_pairs)
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"unexpected CLIP vocabulary size {len(vocab)} (want {VOCAB_SIZE})")
    return {tok: i for i, tok in enumerate(vocab)}, [" ".join(p) for p in merge_pairs]


def write_tokenizer(out_dir: Path, bpe_path: Path | None = None, pad_token: str = "<|endoftext|>"):
    """Write a transformers CLIPTokenizer folder. SDXL ships two: ``tokenizer`` pads with
    <|endoftext|>, ``tokenizer_2`` pads with "!" (id 0); we mirror that."""
    from transformers import CLIPTokenizer

    bpe_path = Path(bpe_path) if bpe_path else find_bpe_file()
    vocab, merges = vocab_and_merges(bpe_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = out_dir / "vocab.json"
    merges_file = out_dir / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(
        str(vocab_file),
        str(merges_file),
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token=pad_token,
        model_max_length=MAX_LENGTH,
    )
    tok.save_pretrained(str(out_dir))
    # save_pretrained also writes tokenizer.json (~2 MB); vocab.json + merges.txt are enough
    # to load, and the repo-size budget is tight, so keep only those.
    for extra in ("tokenizer.json",):
        p = out_dir / extra
        if p.exists():
            p.unlink()
    return tok


def reference_tokenize(texts: list[str], context_length: int = MAX_LENGTH):
    """Token ids from open-clip's own (reference) SimpleTokenizer, loaded from its file so the
    heavy package __init__ is skipped.  Needs open-clip-torch + ftfy; raises ImportError else."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise ImportError("open_clip not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer_ref", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)  # needs ftfy, regex, torch
    tok = mod.SimpleTokenizer()
    return tok(texts, context_length=context_length).tolist()
