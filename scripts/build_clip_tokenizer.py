"""Build training/configs/clip_tokenizer/ (vocab.json, merges.txt) from CLIP's BPE file.

Run once, offline, with `clip-anytorch` installed (`pip install --no-deps clip-anytorch`):
    python scripts/build_clip_tokenizer.py
The tables are built exactly as CLIP's SimpleTokenizer builds them: the 256 byte
characters, the same with `</w>`, one entry per merge for merge lines 1..48894, then the
two special tokens (49408 entries).
"""
import gzip
import hashlib
import importlib.util
import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "training" / "configs" / "clip_tokenizer"
NUM_MERGES = 49152 - 256 - 2  # as in CLIP's simple_tokenizer.py


def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def main() -> None:
    spec = importlib.util.find_spec("clip")
    if spec is None or spec.origin is None:
        raise SystemExit("install clip-anytorch first: pip install --no-deps clip-anytorch")
    bpe_path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    digest = hashlib.sha256(bpe_path.read_bytes()).hexdigest()
    print(f"wrote {OUT} from {bpe_path.name} (sha256 {digest})")


if __name__ == "__main__":
    main()
