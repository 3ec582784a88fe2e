"""Train a stage: `python train.py experiment=vae_tiny` (autoencoder) or `experiment=tiny autoencoder_ckpt=...`."""

import hydra
from omegaconf import DictConfig

import ldm.utils.hydra_build  # noqa: F401  (registers the config resolvers)


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ldm.training.run import train

    result = train(cfg)
    print(f"final checkpoint: {result['checkpoint']}")


if __name__ == "__main__":
    main()
