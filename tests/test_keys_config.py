import pytest

import p2pkv
from p2pkv import ConfigError, EngineConfig, InvalidKey, TransferKey
from p2pkv.keys import MAX_ID_LEN, MAX_NAME_LEN


def test_key_roundtrip_and_str():
    k = TransferKey("xfer-1", "model.layers.0.attn")
    assert TransferKey.from_wire(k.to_wire()) == k
    assert str(k) == "xfer-1/model.layers.0.attn"
    assert hash(k) == hash(TransferKey("xfer-1", "model.layers.0.attn"))


@pytest.mark.parametrize("tid,name,needle", [
    ("", "a", "transfer_id must not be empty"),
    ("a", "", "name must not be empty"),
    ("x" * (MAX_ID_LEN + 1), "a", "limit is"),
    ("a", "n" * (MAX_NAME_LEN + 1), "limit is"),
    ("a\x00b", "a", "control character"),
    ("a", "line\nbreak", "control character"),
    ("a", "del\x7f", "control character"),
    (3, "a", "must be a str"),
    ("a", b"bytes", "must be a str"),
    (None, "a", "must be a str"),
])
def test_bad_keys(tid, name, needle):
    with pytest.raises(InvalidKey, match=needle):
        TransferKey(tid, name)


def test_key_from_wire_rejects_other_shapes():
    for bad in ("a/b", ["a"], ["a", "b", "c"], {"a": 1}, None, [1, 2]):
        with pytest.raises(InvalidKey):
            TransferKey.from_wire(bad)


def test_key_is_frozen():
    k = TransferKey("a", "b")
    with pytest.raises(AttributeError):
        k.name = "c"  # type: ignore[misc]


def test_new_transfer_id_unique():
    ids = {p2pkv.new_transfer_id() for _ in range(1000)}
    assert len(ids) == 1000
    TransferKey(next(iter(ids)), "x")


def test_config_defaults_and_derived():
    c = EngineConfig()
    assert c.effective_peer_timeout_s <= c.timeout_s
    assert c.effective_heartbeat_s < c.effective_peer_timeout_s
    assert c.effective_credit_bytes == c.pool_bytes // 2
    c2 = EngineConfig(timeout_s=2)
    assert c2.effective_peer_timeout_s == 2.0
    c3 = c.replace(timeout_s=1, pool_bytes=2**20)  # derived values follow the new fields
    assert c3.effective_peer_timeout_s == 1.0 and c3.effective_credit_bytes == 2**19


@pytest.mark.parametrize("kw,needle", [
    ({"port": 70000}, "port"),
    ({"port": -1}, "port"),
    ({"port": "80"}, "port"),
    ({"device": "gpu"}, "device"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"timeout_s": float("nan")}, "timeout_s"),
    ({"timeout_s": float("inf")}, "timeout_s"),
    ({"timeout_s": 1e7}, "timeout_s.*at most 1e6"),  # longer deadlines are refused (README: Guarantees)
    ({"ttl_s": 2e6}, "ttl_s.*at most 1e6"),
    ({"nccl_init_timeout_s": 1e300}, "nccl_init_timeout_s"),
    ({"ttl_s": -1}, "ttl_s"),
    ({"pool_bytes": 0}, "pool_bytes"),
    ({"pool_bytes": "lots"}, "pool_bytes"),
    ({"transport": "rdma"}, "transport"),
    ({"auth_token": ""}, "auth_token"),
    ({"timeout_s": 1, "peer_timeout_s": 2}, "peer_timeout_s"),
    ({"heartbeat_s": 3, "peer_timeout_s": 2}, "heartbeat_s"),
    ({"credit_bytes": 2**30, "pool_bytes": 2**20}, "credit_bytes"),
    ({"host": "bad host"}, "host"),
])
def test_config_validation(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        EngineConfig(**kw)


def test_config_longest_timeout_is_accepted():
    c = EngineConfig(timeout_s=1e6, ttl_s=1e6, peer_timeout_s=1e6, heartbeat_s=10)
    assert c.timeout_s == 1e6 and c.ttl_s == 1e6


def test_config_from_dict_coerces_and_rejects_unknown():
    c = EngineConfig.from_dict({"timeout_s": "7.5", "pool_bytes": "64MiB", "port": "0", "auth_token": "s3"})
    assert c.timeout_s == 7.5 and c.pool_bytes == 64 * 2**20 and c.auth_token == "s3"
    with pytest.raises(ConfigError, match="unknown config key"):
        EngineConfig.from_dict({"timeout": 5})
    with pytest.raises(ConfigError):
        EngineConfig.from_dict(["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cannot convert"):
        EngineConfig.from_dict({"timeout_s": "soon"})


def test_config_constructor_rejects_unknown_settings_with_config_error():
    """A misspelt keyword to EngineConfig(...) (or replace) is a ConfigError naming it, as from_dict's is,
    not a bare TypeError; pickling and copying still work."""
    import copy
    import pickle

    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['timeout'\]"):
        EngineConfig(timeout=5)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="unknown config key"):
        EngineConfig(timeout_s=5).replace(pool=1)
    with pytest.raises(ConfigError, match="positional"):
        EngineConfig(*range(len(EngineConfig.field_names()) + 1))
    c = EngineConfig(timeout_s=5, pool_bytes=2**20)
    assert pickle.loads(pickle.dumps(c)) == c and copy.deepcopy(c) == c
    assert c.replace(port=1).port == 1


def test_config_from_env():
    env = {"P2PKV_TIMEOUT_S": "9", "P2PKV_POOL_BYTES": "1GiB", "P2PKV_TRANSPORT": "tcp", "OTHER": "x"}
    c = EngineConfig.from_env(env)
    assert c.timeout_s == 9.0 and c.pool_bytes == 2**30 and c.transport == "tcp"
    c = EngineConfig.from_env(env, timeout_s=3)
    assert c.timeout_s == 3.0
    with pytest.raises(ConfigError):
        EngineConfig.from_env({"P2PKV_PORT": "http"})


def test_config_from_env_warns_of_a_misspelt_setting(caplog):
    """P2PKV_TIMEOUT=5 (for P2PKV_TIMEOUT_S) was ignored without a word; it is still ignored (other P2PKV_*
    variables belong to the proxy, SGLang or CI), but a near-miss of a setting's name is logged."""
    env = {"P2PKV_TIMEOUT": "5", "P2PKV_TTL": "3", "P2PKV_POOLBYTES": "1GiB", "P2PKV_TRANSPORT": "tcp",
           "P2PKV_PROXY_REGISTER_TOKEN": "t" * 16, "P2PKV_SGLANG_HTTP_TIMEOUT_S": "3", "P2PKV_TRACE": "1",
           "P2PKV_CI_SKIP_SOAK": "1", "P2PKV_DISABLE_CUDA_KERNELS": "1"}
    with caplog.at_level("WARNING", logger="p2pkv"):
        c = EngineConfig.from_env(env)
    assert c.timeout_s == 30.0 and c.transport == "tcp"
    warned = sorted(r.getMessage().split(" ")[0] for r in caplog.records)
    assert warned == ["P2PKV_POOLBYTES", "P2PKV_TIMEOUT", "P2PKV_TTL"]
    assert "did you mean P2PKV_TIMEOUT_S?" in caplog.text and "P2PKV_TTL_S?" in caplog.text


def test_config_to_dict_hides_token():
    assert EngineConfig(auth_token="secret").to_dict()["auth_token"] == "***"
