"""Convert the PnP-OVSS authors' GPT-4o class lists into a `candidates_file` ({image_id: [names]}).

    python tools/gpt4o_lists.py voc_classification_noboundary.json -o voc_lists.json

The authors publish, per benchmark, JSON files whose values are GPT-4o's answers as text:
`"[2: 'bicycle', 15: 'person'], [100, 80]"`, the classes (their list's 1-based id and name,
quoted or not) and a confidence per class (a number, `95%`, or `person: 95%`). Their code keeps
the classes whose confidence is above 70; so does this tool (`--min-confidence`). Names are kept
as written (`pottedplant`, `tvmonitor`, `table`; of ADE20K's `door;double;door` the first name,
`door`, as in the MMSeg class list): the `file` candidate rule matches them to the
dataset's classes through its synonyms and reports any it cannot match. An answer with no class
above the cut gets an empty list (every pixel background); the authors' code falls back to their
list's first class there instead. A value that cannot be read is a one-line error naming its id.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

_CLASS = re.compile(r"^\s*(\d+)\s*:\s*['\"]?(.*?)['\"]?\s*$")


def parse_answer(text: str, min_confidence: float = 70.0) -> list[str]:
    """The class names of one GPT-4o answer whose confidence is above `min_confidence`.

    ValueError when the text is not `[id: name, ...], [confidence, ...]` with one confidence per
    class (text without a bracketed list included). An empty answer (or `[]`) gives [].
    """
    if not isinstance(text, str):
        raise ValueError(f"expected the answer as text, got {type(text).__name__}")
    groups = re.findall(r"\[([^\[\]]*)\]", text.replace("\n", " "))
    if not groups and text.strip():  # prose, or a list without brackets: never read as "no class"
        raise ValueError(f"no [id: name, ...] class list in {text.strip()[:60]!r}")
    if not groups or not groups[0].strip():
        return []
    classes = []
    for item in groups[0].split(","):
        match = _CLASS.match(item)
        if not match or not match.group(2).strip():
            raise ValueError(f"cannot read the class {item.strip()!r} (want `id: 'name'`)")
        classes.append(match.group(2).split(";")[0].strip())
    if len(groups) < 2:
        raise ValueError("no confidences after the class list")
    confidences = []
    for item in groups[1].split(","):
        number = item.split(":")[-1].strip().rstrip("%").strip()
        try:
            confidences.append(float(number))
        except ValueError:
            raise ValueError(f"cannot read the confidence {item.strip()!r}") from None
    if confidences and all(c <= 1 for c in confidences) and any(0 < c < 1 for c in confidences):
        raise ValueError(f"the confidences {groups[1].strip()} look like fractions: the authors' answers "
                         "give percents (scale them, or pass --min-confidence 0.7)")
    if len(confidences) != len(classes):
        raise ValueError(f"{len(classes)} classes but {len(confidences)} confidences")
    return [name for name, p in zip(classes, confidences) if p > min_confidence]


def convert(data: dict, min_confidence: float = 70.0) -> dict[str, list[str]]:
    """{image_id: answer text} -> {image_id: [names]}; ValueError naming the first bad id."""
    if not isinstance(data, dict):
        raise ValueError("the file must hold a JSON object {image_id: answer}")
    out = {}
    for image_id, answer in data.items():
        try:
            out[str(image_id)] = parse_answer(answer, min_confidence)
        except ValueError as err:
            raise ValueError(f"image {image_id!r}: {err}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="the authors' GPT4o_classification/*.json file")
    p.add_argument("-o", "--output", required=True, help="the candidates_file to write")
    p.add_argument("--min-confidence", type=float, default=70.0,
                   help="keep classes with a confidence above this (default %(default)s, the authors')")
    args = p.parse_args(argv)
    try:
        data = json.loads(Path(args.source).read_text(encoding="utf-8"))
        lists = convert(data, args.min_confidence)
    except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        print(f"error: {args.source}: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    Path(args.output).write_text(json.dumps(lists, indent=1) + "\n", encoding="utf-8")
    empty = sum(1 for names in lists.values() if not names)
    print(f"wrote {len(lists)} images' class lists to {args.output} ({empty} with no class above "
          f"{args.min_confidence:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
