"""The data stages of dvc.yaml, keyed by profile: ``python -m reproduce.stages {raw,prepare} --profile P``.

``raw`` makes ``data/raw/<profile>``: the synthetic scenes for ``mini``; the official archives
(downloaded, or placed by hand) for ``kitti`` and ``coco``. ``prepare`` converts it to COCO-format
JSON in ``data/prepared/<profile>/{train,val[,test]}.json``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, load_params


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
        from .synth import generate
        s = params["data"]["synth"]
        return generate(out, seed=s["seed"], num_train=s["num_train"], num_val=s["num_val"], num_test=s["num_test"],
                        width=s["width"], height=s["height"], difficulty=s["difficulty"])
    from .download import download_dataset
    return download_dataset(dataset, root=out)


def make_prepared(params: dict, profile: str) -> dict:
    from .prepare import prepare_coco, prepare_kitti
    dataset, raw, out = dataset_of(params, profile), raw_dir(params, profile), prepared_dir(params, profile)
    if dataset == "coco":
        return prepare_coco(raw, out, max_images=params["data"]["coco"].get("max_images"))
    k = params["data"]["kitti"]
    return prepare_kitti(raw, out, classes=k["classes"], class_map=k.get("class_map") or {},
                         ignore_types=k["ignore_types"], val_fraction=k["val_fraction"], split_seed=k["split_seed"],
                         dataset=dataset)


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
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
