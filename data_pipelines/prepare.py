"""Raw text (.txt, .jsonl, .parquet) -> ArrayRecord document shards with a train/validation
split. The same as `maxgpt prepare`; run `python data_pipelines/prepare.py --help`."""

import sys

from maxgpt.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
