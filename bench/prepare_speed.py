"""How long data preparation takes per 100K samples, and that it runs in bounded memory.

    python bench/prepare_speed.py [--samples 100000] [--images 2000] [--workers N]

Generates a LLaVA-665K-like JSON list (multi-turn conversations of 30-300 words, 90% with an image, 10%
text-only) whose samples reference --images distinct 336x336 JPEGs (reused cyclically: each sample is still
checked and decoded on its own), trains a 32K byte-level BPE tokenizer (the size of LLaMA's vocabulary) on the
generated text, and prepares the file with the vicuna_v1 template and 576 image tokens per image (CLIP-L-336),
once with --verify-images decode and once with header, each in a fresh process. Prints seconds, samples/s,
seconds per 100K samples, the peak RSS of the preparing process and of its largest worker, and the preparing
process's peak anonymous memory (RSS also counts the pages of the memory-mapped Arrow files it reads, which grow
with the data but are page cache, not held objects; run with two --samples values to compare).
"""
import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time

from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lvlm_region.data import prepare
from lvlm_region.model.families.llava import FixedImages  # noqa: E402
from lvlm_region.data.templates import resolve  # noqa: E402

WORDS = ("the a of and to in is on with for this that image shows what color shape where left right top bottom "
         "person people car dog cat table window building street sky tree water red blue green yellow white black "
         "small large two three many there are sitting standing holding looking near behind front next picture "
         "describe detail answer question short word phrase using single").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def make_data(root: str, n: int, n_images: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "images"))
    for i in range(n_images):
        Image.effect_noise((336, 336), 40 + i % 30).convert("RGB").save(os.path.join(root, "images", f"{i}.jpg"),
                                                                       quality=90)
    path = os.path.join(root, "data.json")
    with open(path, "w") as f:
        f.write("[\n")
        for i in range(n):
            turns = []
            for t in range(rng.choice((1, 1, 2, 3, 5))):
                q = sentence(rng, rng.randint(5, 25))
                turns += [{"from": "human", "value": q}, {"from": "gpt", "value": sentence(rng, rng.randint(3, 120))}]
            s = {"id": str(i), "conversations": turns}
            if rng.random() < 0.9:
                s["image"] = f"images/{i % n_images}.jpg"
                turns[0]["value"] = "<image>\n" + turns[0]["value"]
            f.write(("," if i else "") + json.dumps(s) + "\n")
        f.write("]\n")
    return path


def make_tokenizer(root: str, data: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [data] + [os.path.join(d, f) for d in (os.path.dirname(json.__file__),) for f in os.listdir(d)
                       if f.endswith(".py")]
    site = os.path.dirname(os.path.dirname(random.__file__))
    for dirpath, _, files in os.walk(os.path.join(site, "site-packages", "transformers", "models")):
        corpus += [os.path.join(dirpath, f) for f in files if f.endswith(".py")]
    trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=["<image>"])


def prepare_in_this_process(data: str, root: str, tok_dir: str, verify: str, workers: int) -> None:
    """Child process: prepare and print time and peak memory (nothing else has run in this process)."""
    from transformers import PreTrainedTokenizerFast
    import datasets
    datasets.disable_progress_bars()
    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    layout = FixedImages(tok.convert_tokens_to_ids("<image>"), 576)
    enc = prepare.Encoding(resolve("vicuna_v1", tok, "bench tokenizer"), layout, 4096, verify)
    peak_anon = [0]
    done = threading.Event()

    def watch() -> None:  # anonymous memory (heap), unlike RSS without the memory-mapped Arrow files' pages
        while not done.is_set():
            with open("/proc/self/status") as f:
                kb = next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
            peak_anon[0] = max(peak_anon[0], kb)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t = time.perf_counter()
    ds = prepare.prepare(data, root, enc, tok, os.path.join(root, f"prepared-{verify}"), workers=workers)
    s = time.perf_counter() - t
    done.set()
    watcher.join()
    n = json.load(open(os.path.join(root, f"prepared-{verify}", prepare.REPORT)))["samples"]
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    print(f"--verify-images {verify}: {len(ds)} kept in {s:.1f} s with {workers} workers: {n / s:.0f} samples/s, "
          f"{s * 100_000 / n:.0f} s per 100K samples; peak RSS {own:.2f} GB (largest worker {kids:.2f} GB), of which "
          f"anonymous (heap) at most {peak_anon[0] / 1e6:.2f} GB in the preparing process")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--samples", type=int, default=100_000)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--child", nargs=4, metavar=("DATA", "ROOT", "TOKENIZER", "VERIFY"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        prepare_in_this_process(*args.child, workers=args.workers)
        return
    with tempfile.TemporaryDirectory() as root:
        t = time.perf_counter()
        data = make_data(root, args.samples, args.images)
        tok = make_tokenizer(root, data)
        tok_dir = os.path.join(root, "tokenizer")
        tok.save_pretrained(tok_dir)
        print(f"generated {args.samples} samples ({os.path.getsize(data) / 1e6:.0f} MB JSON), {args.images} images "
              f"and a {len(tok)}-token BPE tokenizer in {time.perf_counter() - t:.0f} s")
        for verify in ("decode", "header"):
            subprocess.run([sys.executable, __file__, "--workers", str(args.workers), "--child", data, root, tok_dir,
                            verify], check=True)


if __name__ == "__main__":
    main()
