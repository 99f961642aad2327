"""text-completion in Python: complete a prompt, streaming the text as it is generated.

    text_completion [--prompt] TEXT [--max-tokens N] [--temperature T] [--top-p P]
                    [--top-k K] [--seed S] [--ignore-eos] [--stop TEXT]...

The same tokens as the Rust `text-completion` (and `pie-trio complete`): the prompt in one
forward pass, every further token in one more, sampled on the host (temperature 0: greedy).
"""

import inferlet

OPTIONS = {"--prompt": str, "--max-tokens": int, "--temperature": float, "--top-p": float,
           "--top-k": int, "--seed": int}
FLAGS = ("--ignore-eos",)


def parse(argv):
    """Options by name (argparse imports modules lazily, outside the build's snapshot)."""
    values = {"--max-tokens": 128, "--temperature": 0.0, "--stop": []}
    words = []
    items = iter(argv)
    for item in items:
        if item in FLAGS:
            values[item] = True
        elif item == "--stop":
            values["--stop"].append(next(items))
        elif item in OPTIONS:
            values[item] = OPTIONS[item](next(items))
        else:
            words.append(item)
    values["--prompt"] = values.get("--prompt") or " ".join(words)
    if not values["--prompt"]:
        raise ValueError("no prompt: pass --prompt TEXT or the text as arguments")
    return values


async def main():
    options = parse(await inferlet.args())
    model = await inferlet.Model.load()
    sampler = inferlet.Sampler(options["--temperature"], top_k=options.get("--top-k"),
                               top_p=options.get("--top-p"), seed=options.get("--seed"))
    stop_tokens = [] if options.get("--ignore-eos") else model.stop_tokens
    stop = inferlet.StopCondition(options["--max-tokens"], stop_tokens, options["--stop"])
    ctx = model.new_context()
    await ctx.fill(options["--prompt"])
    generated = await ctx.generate(sampler, stop, stream=True)
    await inferlet.set_return(generated.text)
