from setuptools import find_packages, setup

setup(
    name="d2kd",
    version="0.1.0",
    description="Knowledge distillation for object detectors, as a detectron2 extension",
    packages=find_packages(include=["d2kd", "d2kd.*"]),
    python_requires=">=3.10",
    # detectron2 itself is installed by tools/install_detectron2.sh (it is not on PyPI).
    install_requires=[
        "torch",
        "torchvision",
        "fvcore",
        "pycocotools",
        "opencv-python-headless",
    ],
)
