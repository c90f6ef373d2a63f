"""Check a DeepSpeed hostfile before a multi-node job: one line per node, '<hostname> slots=<n>'.

    python launchers/check_hostfile.py launchers/hostfile.example
    # launchers/hostfile.example: 2 hosts, 16 slots

Exit status 0 and a one-line summary if the file is good; otherwise ``error: <file,
line, offending text and fix>`` on stderr and exit status 2. Needs no torch or
DeepSpeed import; see codir_ds/engine/hostfile.py for what is accepted.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from codir_ds.cli import run_main  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hostfile", help="path of the hostfile (as passed to deepspeed --hostfile)")
    args = ap.parse_args()
    from codir_ds.engine.hostfile import parse_hostfile, summary

    hosts = parse_hostfile(args.hostfile)
    print(f"{args.hostfile}: {summary(hosts)}", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
