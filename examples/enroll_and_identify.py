"""Enroll a folder of people, then identify the faces of a photo.

    python examples/enroll_and_identify.py PEOPLE_DIR PHOTO [--gallery gallery.npz]

PEOPLE_DIR holds one sub-folder per person (the folder name is the identity) with one or
more photos of that person. The gallery is saved so later runs can skip enrolment.
"""
import argparse
import sys
from pathlib import Path

import kpface
from kpface.image import list_images, load_image


def enroll(pipe, people: Path) -> kpface.Gallery:
    gallery = kpface.Gallery(threshold=pipe.threshold)
    for person in sorted(p for p in people.iterdir() if p.is_dir()):
        faces = []
        for photo in list_images(person):
            found = pipe(load_image(photo))
            if found:
                faces.append(max(found, key=lambda f: f.score))
        if faces:
            gallery.enroll(person.name, faces)
            print(f"enrolled {person.name}: {len(faces)} photo(s)")
        else:
            print(f"skipped {person.name}: no face in any photo", file=sys.stderr)
    return gallery


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("people", type=Path)
    ap.add_argument("photo")
    ap.add_argument("--gallery", type=Path, default=Path("gallery.npz"))
    ap.add_argument("--models")
    args = ap.parse_args()
    try:
        pipe = kpface.FacePipeline.from_dir(args.models)
        if args.gallery.exists():
            gallery = kpface.Gallery.load(args.gallery)
        else:
            gallery = enroll(pipe, args.people)
            gallery.save(args.gallery)
        for i, face in enumerate(pipe(load_image(args.photo))):
            name, score, known = (gallery.identify(face, k=1) or [("?", 0.0, False)])[0]
            print(f"face {i} at {face.box.round().tolist()}: "
                  f"{name if known else 'unknown'} (cosine {score:.3f})")
    except kpface.KpfaceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
