"""Train a sentencepiece tokenizer on a prepared dataset. The same as
`maxgpt tokenizer train`; run `python data_pipelines/train_tokenizer.py --help`."""

import sys

from maxgpt.cli import main

if __name__ == "__main__":
    sys.exit(main(["tokenizer", "train", *sys.argv[1:]]))
