"""adversarial: misbehaves on purpose, as its first argument says (the runtime's tests).

    adversarial loop | grow | raise | huge | ok
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
    await inferlet.set_return("ok")
