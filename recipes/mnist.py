"""The main job: QMLHFL on non-IID MNIST. ``python -m recipes.mnist [hydra overrides]`` (config:
recipes/conf/mnist.yaml)."""

from recipes.entry import hydra_entry

main = hydra_entry("mnist")

if __name__ == "__main__":
    main()
