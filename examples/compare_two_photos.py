"""Embed the main face of two photos and say whether they are the same person (no verdict, exit
4, when the recognizer's weights are random or partial).

    python examples/compare_two_photos.py a.jpg b.jpg [--models DIR]

Models come from `kpface demo` (default $KPFACE_HOME/models) or your own `kpface export`s.
"""
import argparse
import sys

import kpface
from kpface.image import load_image


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--models")
    args = ap.parse_args()
    try:
        pipe = kpface.FacePipeline.from_dir(args.models)
        faces = []
        for path in (args.a, args.b):
            found = pipe(load_image(path))
            if not found:
                print(f"{path}: no face found", file=sys.stderr)
                return 1
            faces.append(max(found, key=lambda f: f.score))
        result = pipe.compare(*faces)
    except kpface.KpfaceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if pipe.verdict_problem:  # random or partial recognizer weights: no identity verdict
        print(f"cosine {result.cosine:.3f}; no verdict: {pipe.verdict_problem}", file=sys.stderr)
        return 4
    verdict = "same person" if result.same else "different people"
    print(f"cosine {result.cosine:.3f} (threshold {result.threshold}): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
