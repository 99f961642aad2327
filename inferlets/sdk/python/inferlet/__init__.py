"""The pie-trio inferlet SDK for Python (docs/python-sdk.md).

    import inferlet

    async def main():
        model = await inferlet.Model.load()
        ctx = model.new_context()
        await ctx.fill("Once upon a time")
        out = await ctx.generate(inferlet.Sampler(), inferlet.StopCondition(32), stream=True)
        await inferlet.set_return(out.text)

Build it with `pie-trio build my_inferlet.py -o my_inferlet.wasm`.
"""

from inferlet.context import Context, Generated
from inferlet.host import (
    InferletError,
    Pending,
    Task,
    call,
    discard,
    gather,
    request,
    run,
    spawn,
)
from inferlet.model import Model, Queue, Sampler, StopCondition, detokenize, tokenize
from inferlet.runtime import (
    args,
    broadcast,
    clock,
    instance_id,
    raw,
    receive,
    send,
    set_return,
    sleep,
    store_delete,
    store_get,
    store_list,
    store_set,
    subscribe,
    topic_receive,
    version,
)

__all__ = [
    "Context", "Generated", "InferletError", "Model", "Pending", "Queue", "Sampler",
    "StopCondition", "Task", "args", "broadcast", "call", "clock", "detokenize", "discard",
    "gather",
    "instance_id", "raw", "receive", "request", "run", "send", "set_return", "sleep",
    "spawn", "store_delete", "store_get", "store_list", "store_set", "subscribe",
    "tokenize", "topic_receive", "version",
]
