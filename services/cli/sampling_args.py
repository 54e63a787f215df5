"""Flags for every SamplingParams field, and the validated SamplingParams they give.

Range checks live in SamplingParams.validate (one place for the CLI and the services);
its errors are re-labelled with the flag name so the message points at what to change.
"""

from __future__ import annotations

import argparse

from services.engine.errors import InvalidRequestError
from services.engine.sampling_params import SamplingParams


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--max-tokens", type=int, default=16, metavar="N", help="most tokens to generate (16)"
    )
    group.add_argument(
        "--min-tokens",
        type=int,
        default=0,
        metavar="N",
        help="ignore EOS and stop strings until N tokens exist (0)",
    )
    group.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        metavar="T",
        help="divide logits by T before sampling; 0 selects greedy decoding (1.0)",
    )
    group.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        metavar="P",
        help="nucleus sampling: keep the smallest set of tokens whose mass reaches P, "
        "in (0, 1] (1.0)",
    )
    group.add_argument(
        "--top-k",
        type=int,
        default=0,
        metavar="K",
        help="keep only the K most likely tokens; 0 keeps all (0)",
    )
    group.add_argument(
        "--seed",
        type=int,
        metavar="S",
        help="per-request seed: the same seed gives the same tokens (default: the engine's)",
    )
    group.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STR",
        help="stop when the text contains STR, which is left out of the output; repeatable",
    )
    group.add_argument(
        "--ignore-eos",
        action="store_true",
        help="keep generating past the end-of-sequence token",
    )


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The validated SamplingParams; InvalidRequestError names the offending flag."""
    params = SamplingParams(
        max_tokens=args.max_tokens,
        min_tokens=args.min_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )
    try:
        params.validate()
    except InvalidRequestError as exc:
        flag = "--" + exc.field.replace("_", "-")
        raise InvalidRequestError(flag, exc.description) from None
    return params
