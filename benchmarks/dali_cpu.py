"""NVIDIA DALI's CPU backend on the JPEG fixture of `bench --input`, for the comparison in
docs/benchmarks.md ("Tried and dropped"). DALI is not a dependency: install it beside, e.g.
    python3 -m venv /tmp/dalienv && /tmp/dalienv/bin/pip install nvidia-dali-cuda130 numpy
    /tmp/dalienv/bin/python benchmarks/dali_cpu.py /tmp/jpegs [THREADS]
It decodes with the crop fused into the decode (image_random_crop: RandomResizedCrop's box),
resizes to 224, flips and lays out CHW uint8: what our loader workers hand over.
"""
import sys
import time

from nvidia.dali import fn, pipeline_def, types


@pipeline_def(batch_size=64, device_id=None, prefetch_queue_depth=2)
def jpeg_pipeline(root: str):
    jpegs, labels = fn.readers.file(file_root=f"{root}/train", random_shuffle=True, seed=0)
    images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB, seed=0)
    images = fn.resize(images, resize_x=224, resize_y=224, antialias=True)
    images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW",
                                      mirror=fn.random.coin_flip(seed=0))
    return images, labels


def main() -> None:
    root, threads = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1
    pipe = jpeg_pipeline(root, num_threads=threads)
    pipe.build()
    for _ in range(2):
        pipe.run()
    batches = 10
    began = time.perf_counter()
    for _ in range(batches):
        images, _ = pipe.run()
    seconds = time.perf_counter() - began
    rate = batches * 64 / seconds
    print(f"DALI CPU, {threads} thread(s): {rate:.0f} img/s, {rate / threads:.0f} per thread "
          f"(batch shape {images.as_tensor().shape()})")


if __name__ == "__main__":
    main()
