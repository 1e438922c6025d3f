"""python -m tools.bench SUBCOMMAND [options]: one entry point for every benchmark.

    unet       one UNet call of the full SD 1.5 (or SDXL) architecture: minisd eager, its fast paths, diffusers
    generate   a whole generation, minisd against diffusers
    methods    the cost of each method (Attention Regulation, Attend-and-Excite, SynGen, ...) over plain
    optimizer  the Attention Regulation optimiser against its straightforward reference
    load       peak memory of loading a checkpoint in a dtype
    edges      where a tiny change of the logits moves the regulation optimiser to another result
    app        the page (python -m minisd.app) against the command line, on the plain + regulated pair
    launches   ops (kernel launches on a GPU) of a UNet call, plain and regulated, eager and compiled: no GPU needed
    joint      peak memory of one regulated SD 3.5 joint block: the split-key path against the whole square
    sd3        SD 3.5's MMDiT: one call and a 4-step run, minisd against diffusers
"""
import importlib
import sys

COMMANDS = ("unet", "generate", "methods", "optimizer", "load", "edges", "app", "launches", "joint", "sd3")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    return importlib.import_module(f"tools.bench.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    main()
