"""The data stages of dvc.yaml, keyed by profile: ``python -m reproduce.stages {raw,prepare} --profile P``.

``raw`` makes ``data/raw/<profile>``: the synthetic scenes for ``mini``; for ``kitti`` and ``coco``
the extracted tree already placed there, else the official archives (downloaded, or placed by
hand in ``data/archives/<profile>``). ``prepare`` converts it to COCO-format JSON in
``data/prepared/<profile>/{train,val[,test]}.json``.

Expected failures (bad params, no data and no network, a placed file that fails its checksum,
bad input) end as one line on stderr and exit code 1: they are the user's to fix, and a
traceback would bury the line that says how.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reproduce.core.config import ConfigError, load_params
from reproduce.data.download import DownloadError


def raw_dir(params: dict, profile: str) -> Path:
    return Path("data/raw") / profile


def prepared_dir(params: dict, profile: str) -> Path:
    return Path(params["data"]["prepared"]) / profile


def dataset_of(params: dict, profile: str) -> str:
    try:
        return params["profiles"][profile]["dataset"]
    except KeyError:
        raise ConfigError(f"params: no profile {profile!r} (have {sorted(params.get('profiles', {}))})") from None


def make_raw(params: dict, profile: str) -> Path:
    dataset, out = dataset_of(params, profile), raw_dir(params, profile)
    if dataset == "synth":
        from reproduce.data.synth import generate
        s = params["data"]["synth"]
        return generate(out, seed=s["seed"], num_train=s["num_train"], num_val=s["num_val"], num_test=s["num_test"],
                        width=s["width"], height=s["height"], difficulty=s["difficulty"])
    if dataset == "custom":     # your own data, named in data.custom: nothing to download, only to check
        from reproduce.data.custom_data import check_custom_files
        check_custom_files(params["data"].get("custom"))
        out.mkdir(parents=True, exist_ok=True)
        return out
    from reproduce.data.download import download_dataset
    return download_dataset(dataset, root=out)


def make_prepared(params: dict, profile: str) -> dict:
    """Convert ``data/raw/<profile>`` through the same code as ``python -m reproduce.prepare``."""
    from reproduce.data.prepare import run
    outputs, _out = run(dataset_of(params, profile), raw_dir(params, profile), prepared_dir(params, profile),
                        params)
    return outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduce.stages", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["raw", "prepare"])
    parser.add_argument("--profile", default=None, help="params profile (default: params.yaml's `profile`)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        profile = args.profile or params["profile"]
        if args.stage == "raw":
            print(f"raw data ready: {make_raw(params, profile)}")
        else:
            outputs = make_prepared(params, profile)
            for split, coco in outputs.items():
                print(f"{split}: {len(coco['images'])} images, "
                      f"{sum(1 for a in coco['annotations'] if not a.get('iscrowd'))} objects")
    except (ValueError, OSError, DownloadError) as err:  # ConfigError, PrepareError are ValueErrors
        print(f"error: {args.stage}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: {args.stage}: interrupted; run it again (downloads resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
