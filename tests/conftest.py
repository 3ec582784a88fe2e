import pytest


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> list[str]:
    """Two shards of 24 synthetic captioned shapes each (32 px JPEG, img2dataset layout), written once."""
    from ldm.data.synthetic import write_synthetic_shards

    return write_synthetic_shards(
        tmp_path_factory.mktemp("shapes"), num_samples=48, samples_per_shard=24, resolution=32, seed=0
    )
