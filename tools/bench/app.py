"""Is the page as fast as the command line? The shipped model's plain + regulated pair, as each gives it:

  cli      `python -m minisd.sample ... --regulate --save-attention DIR` in a fresh process: what a person at the
           shell waits for (imports, model load, both images, the grid and the files)
  cli-run  the same command inside this process (minisd.sample.main): the model load, both images and the files,
           without Python's and torch's imports
  app      the page's Run, asked through Gradio's own client of a `python -m minisd.app` started here, from the
           request to the answer in hand: both images, the maps, the loss and the PNGs

The three alternate, run after run, so that a change of load on the machine weighs on all alike; the medians and
the app's ratio to each command-line figure are printed, in wall-clock seconds and in CPU seconds (of the process
that does the work: the command's, this one's, the app server's), the steadier figure on a shared machine.

    python -m tools.bench app                  # 50 steps, 5 rounds, torch's threads (one per core)
    python -m tools.bench app --threads 1      # every process on one thread (OMP_NUM_THREADS=1)
    python -m tools.bench app --steps 10 --rounds 1
"""
import argparse
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tools.bench.timing import median, timed

ROOT = Path(__file__).resolve().parents[2]   # the repository
PROMPT, SEED = "a picture of a green star and a yellow cross", 1   # the page's preset


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(port):
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "minisd.app", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("error: the app did not start (run python -m minisd.app to see why)")
            time.sleep(0.5)


def cpu_seconds(pid=None):
    """CPU seconds so far of process `pid` (Linux), of this process (None), or of its finished children ("children")."""
    if pid == "children":
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.bench app", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of every process (OMP_NUM_THREADS; default: torch's, one per core)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch
        os.environ["OMP_NUM_THREADS"] = str(args.threads)   # the command's and the app's processes inherit it
        torch.set_num_threads(args.threads)
    from gradio_client import Client
    from minisd.sample import main as sample

    port = free_port()
    proc = start_app(port)
    times = {"cli": [], "cli-run": [], "app": []}
    cpu = {k: [] for k in times}
    whose = {"cli": "children", "cli-run": None, "app": proc.pid}   # which process does the work
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        tmp = Path(tempfile.mkdtemp(prefix="bench-app-"))

        def cli_argv(i, where):
            return ["--prompt", PROMPT, "--seed", str(SEED), "--steps", str(args.steps), "--regulate",
                    "--save-attention", str(tmp / f"{where}-maps-{i}"), "--out", str(tmp / f"{where}-{i}.png")]

        def app_run():
            out = client.predict(PROMPT, SEED, args.steps, 5.0, "regulate", "star cross", "", "", "over the image",
                                 api_name="/run")
            assert "plain and" in str(out[-1]), out[-1]   # the status line, not an error
            return out

        run = {"cli": lambda i: subprocess.run([sys.executable, "-m", "minisd.sample", *cli_argv(i, "cli")],
                                               cwd=ROOT, check=True, capture_output=True),
               "cli-run": lambda i: sample(cli_argv(i, "run")),
               "app": lambda i: app_run()}
        app_run()   # the first request pays Gradio's own warm-up once; a page is used more than once
        for i in range(args.rounds):
            order = list(run) if i % 2 == 0 else list(run)[::-1]
            for name in order:
                before = cpu_seconds(whose[name])
                _, wall, _ = timed(lambda: run[name](i))
                times[name].append(wall)
                cpu[name].append(cpu_seconds(whose[name]) - before)
            print(f"round {i + 1}: " + ", ".join(f"{k} {times[k][-1]:.2f} s ({cpu[k][-1]:.2f} s CPU)" for k in times),
                  flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    import torch
    print(f"\nplain + regulated pair, {args.steps} steps, {args.rounds} rounds, {torch.get_num_threads()} torch "
          f"threads, medians:")
    for what, t in (("wall", times), ("CPU", cpu)):
        m = {k: median(v) for k, v in t.items()}
        print(f"  {what}: " + ", ".join(f"{k} {v:.2f} s" for k, v in m.items())
              + f"; app / cli = {m['app'] / m['cli']:.2f}, app / cli-run = {m['app'] / m['cli-run']:.2f}")


if __name__ == "__main__":
    main()
