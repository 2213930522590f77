"""Drives a running `sdrs serve` with the `webuiapi` package (what A1111 clients use), unchanged.

    python webuiapi_client.py PORT MODEL_TITLE OTHER_MODEL_TITLE [USER:PASS]

Exits non-zero with the failed check. Run by crates/sdrs-cli/tests/it/serve.rs.
"""
import base64
import io
import json
import sys
import time

import webuiapi
from PIL import Image


def check(cond, what):
    if not cond:
        raise SystemExit(f"webuiapi check failed: {what}")


def main():
    port = int(sys.argv[1])
    model, other = sys.argv[2], sys.argv[3]
    auth = sys.argv[4] if len(sys.argv) > 4 else None
    if auth:
        user, password = auth.split(":", 1)
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port, username=user, password=password)
        bad = webuiapi.WebUIApi(host="127.0.0.1", port=port, username=user, password="wrong")
        r = bad.session.get(f"{bad.baseurl}/options")
        check(r.status_code == 401, f"wrong credentials give 401, got {r.status_code}")
    else:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port)

    # Wait for the model load queued at start.
    for _ in range(600):
        if api.get_options().get("sd_model_checkpoint"):
            break
        time.sleep(0.1)

    check(model in api.util_get_model_names(), f"{model} listed in {api.util_get_model_names()}")
    check(api.util_get_current_model() == model, f"current model {api.util_get_current_model()}")
    check("Euler a" in api.util_get_sampler_names(), "samplers list Euler a")
    check("karras" in api.util_get_scheduler_names(), "schedulers list karras")

    result = api.txt2img(prompt="a lighthouse at dusk", negative_prompt="blurry", seed=42,
                         width=64, height=48, steps=4, cfg_scale=7, batch_size=2,
                         sampler_name="Euler a")
    check(len(result.images) == 2, f"two images, got {len(result.images)}")
    check(result.image.size == (64, 48), f"image size {result.image.size}")
    check(result.info["seed"] == 42 and result.info["all_seeds"] == [42, 43], f"seeds {result.info}")
    check("Seed: 43" in result.info["infotexts"][1], "infotext of the second image")
    check(result.parameters["steps"] == 4, "parameters echo the request")

    info = api.png_info(result.image)
    check("Seed: 42" in info.info, f"png-info reads the infotext: {info.info!r}")

    again = api.img2img(images=[result.image], prompt="a lighthouse at night", seed=7, steps=4,
                        denoising_strength=0.5, width=64, height=48)
    check(again.image.size == (64, 48), f"img2img size {again.image.size}")
    check("Denoising strength: 0.5" in again.info["infotexts"][0], "img2img infotext")

    progress = api.get_progress()
    check(progress["progress"] == 0.0 and progress["state"]["job_count"] == 0, f"idle {progress}")
    api.interrupt()
    api.skip()

    api.util_set_model(other)
    check(api.util_get_current_model() == other, f"switched to {other}")
    switched = api.txt2img(prompt="a lighthouse at dusk", seed=42, width=64, height=48, steps=4,
                           batch_size=1, sampler_name="Euler a")
    check(switched.info["sd_model_name"] == other.rsplit(".", 1)[0], f"model name {switched.info}")
    api.util_set_model(model)
    print("webuiapi client: ok ("
          f"{len(result.images) + len(again.images) + len(switched.images)} images, "
          f"model switch {model} -> {other} -> {model})")


if __name__ == "__main__":
    main()
