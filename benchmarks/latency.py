"""Single-image CPU latency of the shipped models through the Python API (issue 30): the median
of repeated `Classifier.predict` calls on one thread, for a prepared 28x28 input and for a
240x300 picture with its preparation (`packaging.single_image_speed`, the function `pretrained
package` measures the model card's speed with).

    .venv/bin/python benchmarks/latency.py [--repeats 200] [--cards]

Prints one line per model and writes benchmarks/results-latency.json; `--cards` also writes the
speed into each shipped model's card (src/mnist_resnet/pretrained/NAME.json; docs/models.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mnist_resnet import packaging, pretrained

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=packaging.SPEED_REPEATS)
    parser.add_argument("--cards", action="store_true", help="write the speed into the cards")
    parser.add_argument("--out", type=Path, default=HERE / "results-latency.json")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    rows = {}
    for name in pretrained.NAMES:
        speed = packaging.single_image_speed(pretrained.weights_path(name), args.repeats)
        rows[name] = speed
        print(
            f"{name}: {speed['prepared_28x28_ms']:.2f} ms a prepared 28x28 image, "
            f"{speed['picture_240x300_ms']:.2f} ms a 240x300 picture with its preparation "
            f"(median of {args.repeats}, 1 thread, {speed['cpu']}, torch {speed['torch']})",
            flush=True,
        )
        if args.cards:
            path = pretrained.FOLDER / f"{name}.json"
            meta = json.loads(path.read_text(encoding="utf-8"))
            meta["card"]["speed"] = speed
            path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    command = "benchmarks/latency.py " + " ".join(sys.argv[1:] if argv is None else argv)
    record = {"command": command.strip(), "repeats": args.repeats, "models": rows}
    args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
