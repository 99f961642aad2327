"""parallel-generation in Python: several continuations of one prompt, generated side by side.

    parallel_generation [--prompt] TEXT [--n N] [--max-tokens M] [--temperature T]
                        [--top-p P] [--seed S] [--ignore-eos]

The prompt is filled and forwarded once; N forks share its full KV pages (the partial last page
is run again in each fork), each on a queue of its own so that no fork waits for another's
forward. The forks generate as tasks of one loop (`inferlet.gather`): every fork submits its
forward before the loop waits on the host, so the N sequences advance in the same forward batch.
Fork i samples with seed S + 1000·i (when a seed is given), as the Rust `parallel-generation`.

Each continuation is sent as `{"index": i, "text": ...}`; the return value is the JSON array of
the N texts; the last line on stdout is a JSON report of the pages: the prompt's full pages
shared by every fork, and each fork's pages at its end.
"""

import json

import inferlet

OPTIONS = {"--prompt": str, "--n": int, "--max-tokens": int, "--temperature": float,
           "--top-p": float, "--seed": int}
FLAGS = ("--ignore-eos",)
SEED_STRIDE = 1000  # seeds of different forks stay apart for this many steps


def parse(argv):
    """Options by name (argparse imports modules lazily, outside the build's snapshot)."""
    values = {"--n": 4, "--max-tokens": 32, "--temperature": 0.8}
    words = []
    items = iter(argv)
    for item in items:
        if item in FLAGS:
            values[item] = True
        elif item in OPTIONS:
            values[item] = OPTIONS[item](next(items))
        else:
            words.append(item)
    values["--prompt"] = values.get("--prompt") or " ".join(words)
    if not values["--prompt"] or values["--n"] < 1:
        raise ValueError("need a prompt (--prompt TEXT) and --n of at least 1")
    return values


def sampler_of(options, index):
    seed = options.get("--seed")
    return inferlet.Sampler(options["--temperature"], top_p=options.get("--top-p"),
                            seed=None if seed is None else seed + SEED_STRIDE * index)


async def continue_fork(fork, sampler, stop, index):
    generated = await fork.generate(sampler, stop)
    await inferlet.send(json.dumps({"index": index, "text": generated.text}))
    return generated.text


async def main():
    options = parse(await inferlet.args())
    n = options["--n"]
    model = await inferlet.Model.load()
    stop = inferlet.StopCondition(options["--max-tokens"],
                                  [] if options.get("--ignore-eos") else model.stop_tokens)
    root = model.new_context()
    await root.fill(options["--prompt"])
    await root.flush()
    shared = len(root.kv) // root.page_size  # the full pages a fork shares
    forks = [await root.fork(await model.create_queue()) for _ in range(n)]
    await root.free()  # the forks hold the shared pages now
    texts = await inferlet.gather(*(continue_fork(fork, sampler_of(options, i), stop, i)
                                    for i, fork in enumerate(forks)))
    print(json.dumps({"shared_pages": shared, "fork_pages": [len(f.pages) for f in forks]}))
    for fork in forks:
        await fork.free()
    await inferlet.set_return(json.dumps(texts))
