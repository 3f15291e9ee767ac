"""Generate the embedded demo: shape images, LLaVA-format captions and Q/A, a sentencepiece tokenizer
trained on that text, and the tiny base LlavaForConditionalGeneration checkpoint.

    python data_prep/make_demo.py --output data/demo

The launchers call the same code on first use when no --model/--data is given.
"""
import argparse
import logging

from lvlm_region import demo

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--output", default="data/demo")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    print(demo.ensure(args.output, seed=args.seed))
