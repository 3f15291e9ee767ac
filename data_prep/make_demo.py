"""Generate the embedded demo (shape images, LLaVA-format captions and Q/A, a sentencepiece tokenizer trained on
that text, the tiny base LlavaForConditionalGeneration checkpoint) without training on it:

    python data_prep/make_demo.py --output data/demo

The launchers (and lvlm-region demo) call the same code on first use when no --model/--data is given.
"""
import argparse
import logging

from lvlm_region.data import demo

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--output", default="data/demo", help="the demo directory (default data/demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data and model (default 0)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    print(demo.ensure(args.output, seed=args.seed))
