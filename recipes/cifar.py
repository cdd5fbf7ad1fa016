"""QMLHFL on non-IID CIFAR-10. ``python -m recipes.cifar [hydra overrides]`` (config: recipes/conf/cifar.yaml)."""

from recipes.entry import hydra_entry

main = hydra_entry("cifar")

if __name__ == "__main__":
    main()
