"""adversarial: misbehaves on purpose, as its first argument says (the runtime's tests).

    adversarial loop | grow | raise | huge | ok | stop-and-go | shared-queue

Two modes are well behaved: in `stop-and-go` a streamed generation that ends on a stop token
(its step ahead given up with `discard`) and goes on from there must continue like a free run;
in `shared-queue` two streamed generations on one queue, side by side under `gather`, must
each give what it gives alone (a step ahead reads the latest forward on its queue).
"""

import inferlet


async def main():
    mode = (await inferlet.args() or ["ok"])[0]
    if mode == "loop":
        while True:
            pass
    if mode == "grow":
        hoard = []
        while True:
            hoard.append([0] * 100_000)
    if mode == "raise":
        raise RuntimeError("raised on purpose")
    if mode == "huge":
        await inferlet.raw("ping", payload="x" * (8 << 20))
    if mode == "stop-and-go":
        await stop_and_go()
    if mode == "shared-queue":
        await shared_queue()
    await inferlet.set_return("ok")


async def stop_and_go():
    model = await inferlet.Model.load()
    prompt, greedy = "Once upon a time", inferlet.Sampler()
    free = model.new_context()
    await free.fill(prompt)
    expected = (await free.generate(greedy, inferlet.StopCondition(8))).tokens
    stop_token = expected[4]
    first = expected.index(stop_token)
    ctx = model.new_context()
    await ctx.fill(prompt)
    stopped = await ctx.generate(greedy, inferlet.StopCondition(8, [stop_token]), stream=True)
    if stopped.tokens != expected[:first] or stopped.finish != "stop_token":
        raise AssertionError(f"stopped at {stopped.tokens} ({stopped.finish}), not {first}")
    rest = expected[first + 1:]
    if rest:
        went_on = await ctx.generate(greedy, inferlet.StopCondition(len(rest)), stream=True)
        if went_on.tokens != rest:
            raise AssertionError(f"went on with {went_on.tokens}, not {rest}")


async def shared_queue():
    model = await inferlet.Model.load()
    prompts, greedy = ["Once upon a time", "The quick brown fox"], inferlet.Sampler()
    expected = []
    for prompt in prompts:
        alone = model.new_context()
        await alone.fill(prompt)
        expected.append((await alone.generate(greedy, inferlet.StopCondition(10))).tokens)
    contexts = [model.new_context() for _ in prompts]  # both on queue 0
    for ctx, prompt in zip(contexts, prompts, strict=True):
        await ctx.fill(prompt)
    together = await inferlet.gather(*(
        ctx.generate(greedy, inferlet.StopCondition(10), stream=True) for ctx in contexts))
    for i, generated in enumerate(together):
        if generated.tokens != expected[i]:
            raise AssertionError(f"sequence {i}: {generated.tokens}, alone {expected[i]}")
