"""The tunnel groups file: strict validation, one-line errors, no secrets leaked."""
import hashlib
import textwrap

import pytest

from reverst.config import (
    BasicStrategy, BearerStrategy, ExternalStrategy, Group, GroupsConfig, SecretUnavailable, load_groups,
    parse_groups, parse_k8s_ref,
)
from reverst.errors import ConfigError, ReverstError

SECRETS = ("s3cret-pass", "s3cret-token")
TOKEN_HEX = hashlib.sha256(b"s3cret-token").hexdigest()
TOKEN_SHA = hashlib.sha256(b"s3cret-token").digest()


def parse(text, source="groups.yml", **kwargs):
    return parse_groups(textwrap.dedent(text), source, **kwargs)


def fails(text, source="groups.yml", **kwargs) -> str:
    """Parse, expect a ConfigError, check its shape, return its message."""
    with pytest.raises(ConfigError) as info:
        parse(text, source, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, ReverstError)
    assert message.startswith(f"{source}: ")
    assert len(message.splitlines()) == 1
    for secret in SECRETS + (TOKEN_HEX,):
        assert secret not in message
    return message


# --- valid files -------------------------------------------------------------------


def test_full_example():
    config = parse("""
        groups:
          "app":
            hosts: ["app.dev", "www.app.dev"]
            authentication:
              basic: {username: user, password: s3cret-pass}
              bearer: {token: s3cret-token, scheme: JWT}
              external: {endpoint: "http://auth/ext", scheme: Ext}
          "open": {}
    """)
    assert isinstance(config, GroupsConfig)
    assert config.source == "groups.yml"
    app = config.group("app")
    assert app == Group("app", ("app.dev", "www.app.dev"), (
        BasicStrategy("user", "s3cret-pass", "Basic"),
        BearerStrategy(TOKEN_SHA, "JWT", "token"),
        ExternalStrategy("http://auth/ext", "Ext"),
    ))
    assert not app.is_open
    assert config.group("open").is_open and config.group("open").hosts == ()
    assert config.group("nope") is None
    assert config.group_for_host("app.dev") is app
    assert config.group_for_host("www.app.dev") is app
    assert config.group_for_host("App.dev") is None
    assert config.group_for_host("app.dev:8080") is None


def test_defaults():
    config = parse("""
        groups:
          a:
            authentication:
              basic: {username: u, password: p}
          b:
            authentication:
              bearer: {token: t}
          c:
            authentication:
              external: {endpoint: "https://auth.example/check"}
    """)
    assert config.group("a").strategies[0].scheme == "Basic"
    assert config.group("b").strategies[0].scheme == "Bearer"
    assert config.group("c").strategies[0].scheme == "Bearer"


@pytest.mark.parametrize("text", ["groups: {}", "groups: {}\n# comment\n"])
def test_zero_groups_is_explicit(text):
    assert dict(parse(text).groups) == {}


def test_null_group_and_authentication_are_open():
    config = parse("""
        groups:
          a:
          b: {hosts: [b.dev], authentication: }
    """)
    assert config.group("a").is_open and config.group("b").is_open
    assert config.group_for_host("b.dev").name == "b"


def test_repeated_host_in_one_group_is_kept_once():
    assert parse("groups: {a: {hosts: [x.dev, x.dev]}}").group("a").hosts == ("x.dev",)


def test_config_is_immutable():
    config = parse("groups: {a: {hosts: [a.dev]}}")
    with pytest.raises(TypeError):
        config.groups["b"] = Group("b")
    with pytest.raises(AttributeError):
        config.group("a").hosts = ()


def test_reprs_hide_secrets():
    config = parse(f"""
        groups:
          a:
            authentication:
              basic: {{username: user, password: s3cret-pass}}
              bearer: {{hashedToken: "{TOKEN_HEX}"}}
              external: {{endpoint: "http://u:s3cret-pass@auth/ext", scheme: X}}
    """)
    text = repr(config) + str(config) + repr(config.group("a").strategies)
    for secret in SECRETS + (TOKEN_HEX, repr(TOKEN_SHA)):
        assert secret not in text
    assert "user" in text and "auth/ext" in text


# --- bearer sources ----------------------------------------------------------------


def bearer_of(config, name="a"):
    (strategy,) = config.group(name).strategies
    assert isinstance(strategy, BearerStrategy)
    return strategy


def test_bearer_token():
    strategy = bearer_of(parse("groups: {a: {authentication: {bearer: {token: s3cret-token}}}}"))
    assert strategy.token_sha256 == TOKEN_SHA and strategy.source == "token"


def test_bearer_token_path_absolute(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n\n")
    strategy = bearer_of(parse(f"groups: {{a: {{authentication: {{bearer: {{tokenPath: '{token_file}'}}}}}}}}"))
    assert strategy.token_sha256 == TOKEN_SHA
    assert strategy.source == f"tokenPath:{token_file}"


def test_bearer_token_path_relative_to_groups_file(tmp_path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "token").write_bytes(b"s3cret-token \r\n")
    groups_file = tmp_path / "groups.yml"
    groups_file.write_text("groups: {a: {authentication: {bearer: {tokenPath: secrets/token}}}}\n")
    strategy = bearer_of(load_groups(str(groups_file)))
    assert strategy.token_sha256 == TOKEN_SHA
    assert strategy.source == f"tokenPath:{tmp_path / 'secrets' / 'token'}"


def test_bearer_token_path_relative_to_base_dir(tmp_path):
    (tmp_path / "token").write_text("s3cret-token")
    config = parse("groups: {a: {authentication: {bearer: {tokenPath: token}}}}", "<memory>",
                   base_dir=str(tmp_path))
    assert bearer_of(config).token_sha256 == TOKEN_SHA


def test_bearer_hashed_token():
    strategy = bearer_of(parse(f"groups: {{a: {{authentication: {{bearer: {{hashedToken: '{TOKEN_HEX.upper()}'}}}}}}}}"))
    assert strategy.token_sha256 == TOKEN_SHA and strategy.source == "hashedToken"


def test_bearer_hashed_token_path(tmp_path):
    hashed = tmp_path / "hashed"
    hashed.write_text(f"  {TOKEN_HEX}\n")
    strategy = bearer_of(parse(f"groups: {{a: {{authentication: {{bearer: {{hashedTokenPath: '{hashed}'}}}}}}}}"))
    assert strategy.token_sha256 == TOKEN_SHA
    assert strategy.source == f"hashedTokenPath:{hashed}"


# --- sources -----------------------------------------------------------------------


def test_load_file_url(tmp_path):
    (tmp_path / "token").write_text("s3cret-token\n")
    groups_file = tmp_path / "groups.yml"
    groups_file.write_text("groups:\n  a:\n    hosts: [a.dev]\n    authentication: {bearer: {tokenPath: token}}\n")
    config = load_groups(f"file://{groups_file}")
    assert config.source == f"file://{groups_file}"
    assert config.group_for_host("a.dev").name == "a"
    assert bearer_of(config).token_sha256 == TOKEN_SHA


def test_load_missing_file(tmp_path):
    missing = tmp_path / "nope.yml"
    with pytest.raises(ConfigError) as info:
        load_groups(str(missing))
    message = str(info.value)
    assert message.startswith(f"{missing}: ") and "No such file or directory" in message
    assert len(message.splitlines()) == 1


def test_load_directory(tmp_path):
    with pytest.raises(ConfigError, match="Is a directory"):
        load_groups(f"file://{tmp_path}")


def test_load_kubernetes_source_is_for_reverst_sources():
    with pytest.raises(ConfigError, match=r"^k8s://configmap/ns/name/key: Kubernetes sources are read by "
                                          r"reverst.sources.load_groups$"):
        load_groups("k8s://configmap/ns/name/key")


def test_load_unknown_scheme():
    with pytest.raises(ConfigError, match=r"^http://x/groups.yml: unsupported source"):
        load_groups("http://x/groups.yml")


# --- validation errors -------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    # top level
    ("", "groups.yml: groups: required"),
    ("# only a comment\n", "groups.yml: groups: required"),
    ("other: 1\n", "groups.yml: other: unknown key"),
    ("groups: {}\nextra: 1\n", "groups.yml: extra: unknown key"),
    ("[1, 2]\n", "groups.yml: (top level): must be a mapping with a groups key"),
    ("groups:\n", "groups.yml: groups: must be a mapping of group names to groups"),
    ("groups: [a]\n", "groups.yml: groups: must be a mapping of group names to groups"),
    ("groups: {123: {}}\n", 'groups.yml: groups."123": group name must be a non-empty string (quote it)'),
    ("groups: {'': {}}\n", 'groups.yml: groups."": group name must be a non-empty string (quote it)'),
    # group
    ("groups: {app: [x]}\n", 'groups.yml: groups."app": must be a mapping'),
    ("groups: {app: {host: [x]}}\n", 'groups.yml: groups."app".host: unknown key'),
    ("groups: {app: {hosts: x.dev}}\n", 'groups.yml: groups."app".hosts: must be a list of strings'),
    ("groups: {app: {hosts: [1]}}\n", 'groups.yml: groups."app".hosts: must be a list of strings'),
    ("groups: {app: {hosts: [a, '']}}\n", 'groups.yml: groups."app".hosts[1]: must be a non-empty host name without spaces'),
    ("groups: {app: {hosts: [' a']}}\n", 'groups.yml: groups."app".hosts[0]: must be a non-empty host name without spaces'),
    ("groups: {app: {authentication: [basic]}}\n", 'groups.yml: groups."app".authentication: must be a mapping'),
    ("groups: {app: {authentication: {token: x}}}\n", 'groups.yml: groups."app".authentication.token: unknown key'),
    # basic
    ("groups: {app: {authentication: {basic: {password: s3cret-pass}}}}\n",
     'groups.yml: groups."app".authentication.basic.username: required'),
    ("groups: {app: {authentication: {basic: {username: u}}}}\n",
     'groups.yml: groups."app".authentication.basic.password: required'),
    ("groups: {app: {authentication: {basic: }}}\n",
     'groups.yml: groups."app".authentication.basic.username: required'),
    ("groups: {app: {authentication: {basic: {username: u, password: ''}}}}\n",
     'groups.yml: groups."app".authentication.basic.password: must not be empty'),
    ("groups: {app: {authentication: {basic: {username: u, password: 1234}}}}\n",
     'groups.yml: groups."app".authentication.basic.password: must be a string (quote it)'),
    ("groups: {app: {authentication: {basic: {username: u, pasword: s3cret-pass}}}}\n",
     'groups.yml: groups."app".authentication.basic.pasword: unknown key'),
    ("groups: {app: {authentication: {basic: {username: u, password: s3cret-pass, scheme: 'My Basic'}}}}\n",
     'groups.yml: groups."app".authentication.basic.scheme: must be a single word such as Basic or Bearer'),
    ("groups: {app: {authentication: {basic: s3cret-pass}}}\n",
     'groups.yml: groups."app".authentication.basic: must be a mapping'),
    # bearer
    ("groups: {app: {authentication: {bearer: {}}}}\n",
     'groups.yml: groups."app".authentication.bearer: one of token, tokenPath, hashedToken, hashedTokenPath is required'),
    ("groups: {app: {authentication: {bearer: {scheme: JWT}}}}\n",
     'groups.yml: groups."app".authentication.bearer: one of token, tokenPath, hashedToken, hashedTokenPath is required'),
    ("groups: {app: {authentication: {bearer: {token: s3cret-token, tokenPath: /x}}}}\n",
     'groups.yml: groups."app".authentication.bearer: only one of token, tokenPath, hashedToken, hashedTokenPath '
     'is allowed (found token, tokenPath)'),
    ("groups: {app: {authentication: {bearer: {token: ''}}}}\n",
     'groups.yml: groups."app".authentication.bearer.token: must not be empty'),
    ("groups: {app: {authentication: {bearer: {tokn: s3cret-token}}}}\n",
     'groups.yml: groups."app".authentication.bearer.tokn: unknown key'),
    ("groups: {app: {authentication: {bearer: {hashedToken: s3cret-token}}}}\n",
     'groups.yml: groups."app".authentication.bearer.hashedToken: must be 64 hex digits (a SHA-256 sum)'),
    (f"groups: {{app: {{authentication: {{bearer: {{hashedToken: '{TOKEN_HEX}00'}}}}}}}}\n",
     'groups.yml: groups."app".authentication.bearer.hashedToken: must be 64 hex digits (a SHA-256 sum)'),
    ("groups: {app: {authentication: {bearer: {tokenPath: k8s://secret/ns/name/key}}}}\n",
     'groups.yml: groups."app".authentication.bearer.tokenPath: '
     'Kubernetes secrets need a Kubernetes source reader (reverst.sources)'),
    ("groups: {app: {authentication: {bearer: {hashedTokenPath: k8s://secret/ns/name}}}}\n",
     'groups.yml: groups."app".authentication.bearer.hashedTokenPath: must be k8s://secret/<namespace>/<name>/<key>'),
    ("groups: {app: {authentication: {bearer: {tokenPath: k8s://configmap/ns/name/key}}}}\n",
     'groups.yml: groups."app".authentication.bearer.tokenPath: must be k8s://secret/<namespace>/<name>/<key>'),
    ("groups: {app: {authentication: {bearer: {tokenPath: k8s://secret/ns/name/key/more}}}}\n",
     'groups.yml: groups."app".authentication.bearer.tokenPath: must be k8s://secret/<namespace>/<name>/<key>'),
    ("groups: {app: {authentication: {bearer: {tokenPath: k8s://secret/Team_A/name/key}}}}\n",
     'groups.yml: groups."app".authentication.bearer.tokenPath: invalid Kubernetes namespace "Team_A"'),
    ("groups: {app: {authentication: {bearer: {tokenPath: k8s://secret/ns/-name/key}}}}\n",
     'groups.yml: groups."app".authentication.bearer.tokenPath: invalid Kubernetes secret name "-name"'),
    ("groups: {app: {authentication: {bearer: {tokenPath: 'k8s://secret/ns/name/a:b'}}}}\n",
     'groups.yml: groups."app".authentication.bearer.tokenPath: invalid Kubernetes secret key "a:b"'),
    ("groups: {app: {authentication: {bearer: {tokenPath: 'https://vault/token'}}}}\n",
     'groups.yml: groups."app".authentication.bearer.tokenPath: must be a path, file:///path or '
     'k8s://secret/<namespace>/<name>/<key>'),
    # external
    ("groups: {app: {authentication: {external: {}}}}\n",
     'groups.yml: groups."app".authentication.external.endpoint: required'),
    ("groups: {app: {authentication: {external: {endpoint: 'ftp://auth/x'}}}}\n",
     'groups.yml: groups."app".authentication.external.endpoint: must be an http:// or https:// URL'),
    ("groups: {app: {authentication: {external: {endpoint: 'auth/x'}}}}\n",
     'groups.yml: groups."app".authentication.external.endpoint: must be an http:// or https:// URL'),
    ("groups: {app: {authentication: {external: {endpoint: 'http://auth:99999/x'}}}}\n",
     'groups.yml: groups."app".authentication.external.endpoint: must be an http:// or https:// URL'),
    ("groups: {app: {authentication: {external: {endpoint: 'http://a/', method: GET}}}}\n",
     'groups.yml: groups."app".authentication.external.method: unknown key'),
    ("groups: {app: {authentication: {external: {endpoint: 'http://a/', timeout: true}}}}\n",
     'groups.yml: groups."app".authentication.external.timeout: must be a duration up to 10s, such as 5s'),
    ("groups: {app: {authentication: {external: {endpoint: 'http://a/', timeout: 5x}}}}\n",
     'groups.yml: groups."app".authentication.external.timeout: must be a duration up to 10s, such as 5s'),
    ("groups: {app: {authentication: {external: {endpoint: 'http://a/', timeout: 11s}}}}\n",
     'groups.yml: groups."app".authentication.external.timeout: must be a duration up to 10s, such as 5s'),
    ("groups: {app: {authentication: {external: {endpoint: 'http://a/', timeout: 0s}}}}\n",
     'groups.yml: groups."app".authentication.external.timeout: must be a duration up to 10s, such as 5s'),
    # conflicts
    ("groups: {app: {authentication: {basic: {username: u, password: s3cret-pass, scheme: Token},"
     " bearer: {token: s3cret-token, scheme: token}}}}\n",
     'groups.yml: groups."app".authentication: basic and bearer both use scheme "token"'),
    ("groups: {app: {authentication: {bearer: {token: s3cret-token},"
     " external: {endpoint: 'http://a/'}}}}\n",
     'groups.yml: groups."app".authentication: bearer and external both use scheme "Bearer"'),
    ("groups: {a: {hosts: [x.dev]}, b: {hosts: [y.dev, x.dev]}}\n",
     'groups.yml: groups."b".hosts: host "x.dev" is already in group "a"'),
])
def test_validation_errors(text, expected):
    assert fails(text) == expected


def test_unknown_key_with_odd_name_is_quoted():
    assert fails("groups: {app: {'my key': 1}}\n") == 'groups.yml: groups."app"."my key": unknown key'
    assert fails("groups: {app: {\"a\\nb\": 1}}\n") == 'groups.yml: groups."app"."a\\nb": unknown key'


def test_group_name_with_quotes_is_escaped():
    assert fails("groups: {'a\"b': {x: 1}}\n") == 'groups.yml: groups."a\\"b".x: unknown key'


def test_token_path_missing_file(tmp_path):
    message = fails("groups: {app: {authentication: {bearer: {tokenPath: missing}}}}\n",
                    str(tmp_path / "groups.yml"))
    assert message == (f'{tmp_path}/groups.yml: groups."app".authentication.bearer.tokenPath: '
                       f"cannot read {tmp_path}/missing: No such file or directory")


def test_token_path_empty_file(tmp_path):
    (tmp_path / "token").write_text("\n")
    message = fails("groups: {app: {authentication: {bearer: {tokenPath: token}}}}\n", str(tmp_path / "g.yml"))
    assert message.endswith(f"bearer.tokenPath: file {tmp_path}/token is empty")


def test_hashed_token_path_bad_content(tmp_path):
    (tmp_path / "hashed").write_text("s3cret-token\n")
    message = fails("groups: {app: {authentication: {bearer: {hashedTokenPath: hashed}}}}\n", str(tmp_path / "g.yml"))
    assert message.endswith(f"bearer.hashedTokenPath: file {tmp_path}/hashed must hold 64 hex digits (a SHA-256 sum)")


def test_yaml_syntax_error_names_line():
    message = fails("groups:\n  app:\n    hosts: [a.dev\n  other: {}\n")
    assert message.startswith("groups.yml: line ") and "invalid YAML" in message


def test_yaml_syntax_error_line_number():
    message = fails("groups:\n  app: {}\n  bad: : s3cret-pass\n")
    assert message.startswith("groups.yml: line 3, column ")


def test_yaml_error_does_not_echo_secret():
    fails("groups:\n  app:\n    authentication:\n      basic: {username: u, password: \"s3cret-pass\\q\"}\n")


def test_yaml_duplicate_keys_are_errors():
    message = fails("groups:\n  app: {}\n  app: {}\n")
    assert message == 'groups.yml: line 3, column 3: invalid YAML: duplicate key "app"'


def test_yaml_merge_keys_still_work():
    config = parse("""
        groups:
          a: &base {hosts: [a.dev]}
          b: {<<: *base, hosts: [b.dev]}
    """)
    assert config.group("b").hosts == ("b.dev",)


def test_unsafe_yaml_tags_rejected():
    message = fails("groups: !!python/object:os.system {}\n")
    assert "invalid YAML" in message


def test_groups_config_constructor_checks_host_conflicts():
    with pytest.raises(ConfigError, match=r'^src: groups."b".hosts: host "h" is already in group "a"$'):
        GroupsConfig("src", {"a": Group("a", ("h",)), "b": Group("b", ("h",))})


# --- external timeout, secret readers, Kubernetes references ------------------------


def test_external_timeout():
    config = parse("""
        groups:
          a: {authentication: {external: {endpoint: "http://auth/x"}}}
          b: {authentication: {external: {endpoint: "http://auth/x", timeout: 1500ms}}}
          c: {authentication: {external: {endpoint: "http://auth/x", timeout: 10s}}}
          d: {authentication: {external: {endpoint: "http://auth/x", timeout: 2}}}
    """)
    assert [config.group(n).strategies[0].timeout for n in "abcd"] == [5.0, 1.5, 10.0, 2.0]


def test_external_repr_masks_a_password_in_the_endpoint():
    strategy = ExternalStrategy("https://svc:s3cret-pass@auth.example/check", "Bearer", 2.0)
    assert repr(strategy) == ("ExternalStrategy(endpoint='https://svc:***@auth.example/check', "
                              "scheme='Bearer', timeout=2.0)")
    assert strategy.safe_endpoint == "https://svc:***@auth.example/check"


def test_secrets_come_from_the_reader():
    store = {"k8s://secret/ns/tokens/plain": b"s3cret-token\n", "k8s://secret/ns/tokens/hashed": TOKEN_HEX.encode()}
    asked = []

    def read_secret(ref):
        asked.append(ref)
        return store[ref]

    config = parse("""
        groups:
          a: {authentication: {bearer: {tokenPath: "k8s://secret/ns/tokens/plain"}}}
          b: {authentication: {bearer: {hashedTokenPath: "k8s://secret/ns/tokens/hashed"}}}
    """, read_secret=read_secret)
    assert bearer_of(config, "a").token_sha256 == TOKEN_SHA == bearer_of(config, "b").token_sha256
    assert bearer_of(config, "a").source == "tokenPath:k8s://secret/ns/tokens/plain"
    assert asked == list(store)
    assert config.secret_refs == tuple(store)


@pytest.mark.parametrize("data,expected", [
    (b"\n", "bearer.tokenPath: secret k8s://secret/ns/s/k is empty"),
    (b"x" * 70000, "bearer.tokenPath: secret k8s://secret/ns/s/k is larger than 65536 bytes"),
    (SecretUnavailable("key 'k' not found in Secret ns/s"), "bearer.tokenPath: key 'k' not found in Secret ns/s"),
])
def test_secret_reader_errors(data, expected):
    def read_secret(ref):
        if isinstance(data, Exception):
            raise data
        return data

    message = fails("groups: {app: {authentication: {bearer: {tokenPath: 'k8s://secret/ns/s/k'}}}}\n",
                    read_secret=read_secret)
    assert message == f'groups.yml: groups."app".authentication.{expected}'


def test_secret_refs_lists_files_and_secrets_once(tmp_path):
    (tmp_path / "token").write_text("t")
    config = parse_groups(
        "groups:\n"
        "  a: {authentication: {bearer: {tokenPath: token}}}\n"
        "  b: {authentication: {bearer: {tokenPath: token, scheme: X}, basic: {username: u, password: p}}}\n"
        "  c: {authentication: {bearer: {token: t}}}\n",
        str(tmp_path / "groups.yml"))
    assert config.secret_refs == (str(tmp_path / "token"),)


@pytest.mark.parametrize("ref,expected", [
    ("k8s://configmap/ns/name/key", ("ns", "name", "key")),
    ("k8s://configmap/kube-system/reverst.groups/groups.yml", ("kube-system", "reverst.groups", "groups.yml")),
    ("k8s://configmap/ns/name/Key_1-.x", ("ns", "name", "Key_1-.x")),
])
def test_parse_k8s_ref(ref, expected):
    assert parse_k8s_ref(ref, "configmap") == expected


@pytest.mark.parametrize("ref", ["k8s://configmap/ns/name", "k8s://configmap/ns/name/key/x", "k8s://secret/ns/n/k",
                                 "k8s://configmap//name/key", "k8s://configmap/ns.x/name/key",
                                 "k8s://configmap/" + "n" * 64 + "/name/key", "k8s://configmap/ns/Name/key"])
def test_parse_k8s_ref_rejects(ref):
    with pytest.raises(ValueError):
        parse_k8s_ref(ref, "configmap")
