"""Enroll a folder of people, then identify the faces of a photo.

    python examples/enroll_and_identify.py PEOPLE_DIR PHOTO [--gallery people.kpg] [--allow-random]

PEOPLE_DIR holds one sub-folder per person (the folder name is the identity) with one or
more photos of that person. The gallery file (SQLite) keeps the embeddings, so later runs skip
enrolment. A recognizer with random weights gives scores but no identity verdict unless
--allow-random is given.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

import kpface
from kpface.image import list_images, load_image


def enroll(pipe, people: Path, gallery) -> None:
    for person in sorted(p for p in people.iterdir() if p.is_dir()):
        ids, embeddings = [], []
        for photo in list_images(person):
            found = pipe(load_image(photo))
            if found:
                ids.append(f"{person.name}/{photo.name}")
                embeddings.append(max(found, key=lambda f: f.score).embedding)
        if ids:
            gallery.add(ids, np.stack(embeddings), labels=[person.name] * len(ids))
            print(f"enrolled {person.name}: {len(ids)} photo(s)")
        else:
            print(f"skipped {person.name}: no face in any photo", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("people", type=Path)
    ap.add_argument("photo")
    ap.add_argument("--gallery", type=Path, default=Path("people.kpg"))
    ap.add_argument("--models")
    ap.add_argument("--allow-random", action="store_true")
    args = ap.parse_args()
    try:
        pipe = kpface.FacePipeline.from_dir(args.models)
        with kpface.Gallery.open(args.gallery, model=pipe) as gallery:
            if len(gallery) == 0:
                enroll(pipe, args.people, gallery)
            for i, face in enumerate(pipe(load_image(args.photo))):
                where = f"face {i} at {face.box.round().tolist()}"
                try:
                    m = gallery.identify(face, allow_random=args.allow_random)
                except kpface.RandomWeightsError as e:
                    ids, scores = gallery.search(face, k=1)
                    print(f"{where}: closest {ids[0, 0]} (cosine {scores[0, 0]:.3f}); {e}")
                    continue
                if m is None:
                    print(f"{where}: the gallery is empty")
                else:
                    print(f"{where}: {m.label if m.match else 'unknown'} (cosine {m.score:.3f})")
    except kpface.KpfaceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
