"""A COCO-captions image set as WebDataset shards (img2dataset layout), the evaluation set of eval/fid.py.

python scripts/coco_to_shards.py images=/data/coco/val2014 \
    annotations=/data/coco/annotations/captions_val2014.json out_dir=/data/coco-val2014-shards num_images=30000
python eval/fid.py ckpt=… captions_from=/data/coco-val2014-shards reference=/data/coco-val2014-shards \
    num_images=30000 reference_num_images=30000
"""

import hydra
from omegaconf import DictConfig

import ldm.utils.hydra_build  # noqa: F401  (registers the config resolvers)


@hydra.main(config_path="../configs", config_name="coco_to_shards", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ldm.data.coco import INFO_FILE, coco_to_shards

    record = coco_to_shards(
        cfg.images,
        cfg.annotations,
        cfg.out_dir,
        num_images=cfg.num_images,
        seed=cfg.seed,
        caption=cfg.caption,
        samples_per_shard=cfg.samples_per_shard,
    )
    skipped = ", ".join(f"{k} {v}" for k, v in record["skipped"].items()) or "none"
    print(
        f"{record['num_images']} images in {len(record['shards'])} shards → {cfg.out_dir} "
        f"(skipped: {skipped}); protocol in {cfg.out_dir}/{INFO_FILE}"
    )


if __name__ == "__main__":
    main()
