"""Tests for loading and validating the TOML configuration and finding the API key."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import pytest

from tripo_watchd.config import api_key_help, load_api_key, load_settings, parse_settings
from tripo_watchd.errors import ConfigError
from tripo_watchd.settings import ApiSettings, Settings

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
DEFAULT_LINE = re.compile(r"^# ([a-z_]+ = .*)$")


def write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(data: dict[str, Any], source: Path | None = Path("cfg.toml")) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_settings(data, source)
    return exc.value.message


# --- defaults and the example file ---------------------------------------------------------


def test_no_file_gives_defaults() -> None:
    """Running without a config file uses every documented default."""
    assert load_settings(None) == Settings()
    assert load_settings(None).source is None


def test_empty_file_gives_defaults_with_source(tmp_path: Path) -> None:
    """An empty config file changes nothing but records where the settings came from."""
    path = write(tmp_path, "")
    settings = load_settings(path)
    assert dataclasses.replace(settings, source=None) == Settings()
    assert settings.source == path


def test_example_file_loads_to_defaults() -> None:
    """The shipped config.example.toml loads to exactly the default settings."""
    settings = load_settings(EXAMPLE)
    assert dataclasses.replace(settings, source=None) == Settings()


def test_example_file_uncommented_still_gives_defaults(tmp_path: Path) -> None:
    """Every "# key = value" line in the example is the real default, and every key is there."""
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    uncommented = [m.group(1) if (m := DEFAULT_LINE.match(line)) else line for line in lines]
    path = write(tmp_path, "\n".join(uncommented))
    settings = load_settings(path)
    assert dataclasses.replace(settings, source=None) == Settings()

    import tomllib

    data = tomllib.loads("\n".join(uncommented))
    for section in (f.name for f in dataclasses.fields(Settings) if f.name != "source"):
        cls = type(getattr(Settings(), section))
        assert set(data[section]) == {f.name for f in dataclasses.fields(cls)}, section


def test_values_are_read(tmp_path: Path) -> None:
    """File values override defaults; ints are accepted for floats and lists become tuples."""
    path = write(
        tmp_path,
        '[workers]\ncount = 8\n[api]\ntimeout_seconds = 5\n[watch]\nignore = ["*.x"]\n'
        'mode = "poll"\n',
    )
    settings = load_settings(path)
    assert settings.workers.count == 8
    assert settings.api.timeout_seconds == 5.0
    assert isinstance(settings.api.timeout_seconds, float)
    assert settings.watch.ignore == ("*.x",)
    assert settings.watch.mode == "poll"


# --- file-level errors --------------------------------------------------------------------


def test_missing_file_is_named(tmp_path: Path) -> None:
    """A config path that does not exist is reported with its name."""
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml: no such config file"):
        load_settings(path)


def test_toml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    """A TOML syntax error names the file and the line and column of the mistake."""
    path = write(tmp_path, "[api]\ntimeout_seconds = 3\nprotocol v3\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(path)
    msg = exc.value.message
    assert msg.startswith(f"{path}: not valid TOML")
    assert "line 3" in msg
    assert "column" in msg


# --- unknown names and types --------------------------------------------------------------


def test_unknown_key_suggests_closest() -> None:
    """A misspelt key is reported with its dotted name and the closest known key."""
    msg = error_of({"s3": {"acelerate": "never"}})
    assert msg == "cfg.toml: unknown key s3.acelerate; did you mean s3.accelerate?"


def test_key_in_wrong_section_points_to_right_one() -> None:
    """A key placed under the wrong section says which section it belongs to."""
    msg = error_of({"api": {"region": "eu-west-1"}})
    assert "unknown key api.region" in msg
    assert "s3.region" in msg


def test_unknown_key_without_close_match_lists_known_keys() -> None:
    """An unknown key with no near match lists the keys the section has."""
    msg = error_of({"workers": {"zzz": 1}})
    assert "unknown key workers.zzz" in msg
    assert "count" in msg


def test_unknown_section_suggests_closest() -> None:
    """A misspelt section is reported with the closest known section."""
    msg = error_of({"pipline": {}})
    assert msg == "cfg.toml: unknown section [pipline]; did you mean [pipeline]?"


def test_bool_is_not_an_int() -> None:
    """A boolean where a number belongs is a type error, not silently 1."""
    msg = error_of({"workers": {"count": True}})
    assert msg.startswith("cfg.toml: workers.count = true has the wrong type")
    assert "integer" in msg


def test_string_is_not_a_number() -> None:
    """A quoted number is refused with the key and the expected type."""
    msg = error_of({"api": {"timeout_seconds": "30"}})
    assert msg.startswith('cfg.toml: api.timeout_seconds = "30" has the wrong type')
    assert "a number" in msg


def test_float_is_not_an_int() -> None:
    """A fractional worker count is refused."""
    assert "use an integer" in error_of({"workers": {"count": 2.5}})


def test_section_must_be_a_table() -> None:
    """A section given as a plain value is refused."""
    assert "[api] must be a table" in error_of({"api": 3})


def test_list_of_strings_required() -> None:
    """watch.ignore must be a list of strings."""
    assert "a list of strings" in error_of({"watch": {"ignore": "*.tmp"}})
    assert "a list of strings" in error_of({"watch": {"ignore": ["*.tmp", 3]}})


# --- value rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "allowed"),
    [
        ("api", "protocol", '"v2-sts" or "v3"'),
        ("s3", "accelerate", '"auto", "always" or "never"'),
        ("watch", "mode", '"auto", "native" or "poll"'),
        ("pipeline", "dedupe", '"content", "path" or "off"'),
        ("pipeline", "after_upload", '"keep", "move" or "delete"'),
    ],
)
def test_enum_errors_list_allowed_values(section: str, key: str, allowed: str) -> None:
    """A value outside a fixed choice names the key and every allowed value."""
    msg = error_of({section: {key: "sometimes"}})
    assert msg == f'cfg.toml: {section}.{key} = "sometimes" is not allowed; use {allowed}'


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("api", "timeout_seconds", 0),
        ("api", "max_uploads_per_minute", -1),
        ("workers", "count", 0),
        ("workers", "count", 65),
        ("watch", "settle_seconds", -0.5),
        ("watch", "poll_seconds", 0),
        ("watch", "rescan_seconds", -1),
        ("limits", "image_max_bytes", 0),
        ("limits", "model_max_bytes", -5),
        ("s3", "multipart_chunk_bytes", 1024 * 1024),
        ("s3", "multipart_threshold_bytes", 4 * 1024 * 1024),
        ("s3", "max_concurrency", 0),
        ("pipeline", "max_attempts", 0),
    ],
)
def test_out_of_range_numbers_are_refused(section: str, key: str, value: float) -> None:
    """Numbers that make no sense (zero workers, negative waits, tiny parts) are refused."""
    msg = error_of({section: {key: value}})
    assert msg.startswith(f"cfg.toml: {section}.{key} = {value} is not allowed; use ")


def test_zero_rescan_and_settle_are_allowed() -> None:
    """rescan_seconds = 0 turns rescans off and settle_seconds = 0 sends at once."""
    settings = parse_settings({"watch": {"rescan_seconds": 0, "settle_seconds": 0}})
    assert settings.watch.rescan_seconds == 0.0
    assert settings.watch.settle_seconds == 0.0


def test_infinite_number_is_refused() -> None:
    """TOML's inf is not a usable timeout."""
    assert "finite" in error_of({"api": {"timeout_seconds": float("inf")}})


def test_image_min_must_not_exceed_max() -> None:
    """image_min_px larger than image_max_px is refused, naming both keys."""
    msg = error_of({"limits": {"image_min_px": 500, "image_max_px": 100}})
    assert "limits.image_min_px = 500" in msg
    assert "limits.image_max_px = 100" in msg


def test_empty_watch_paths_refused() -> None:
    """watch.paths must name at least one folder."""
    msg = error_of({"watch": {"paths": []}})
    assert msg.startswith("cfg.toml: watch.paths = [] is not allowed")


def test_move_needs_done_dir(tmp_path: Path) -> None:
    """after_upload = "move" without a done_dir is refused; with one it loads."""
    msg = error_of({"pipeline": {"after_upload": "move"}})
    assert 'pipeline.after_upload = "move" needs pipeline.done_dir' in msg
    ok = parse_settings({"pipeline": {"after_upload": "move", "done_dir": str(tmp_path)}})
    assert ok.pipeline.done_dir == tmp_path


# --- paths --------------------------------------------------------------------------------


def test_relative_paths_resolve_against_config_dir(tmp_path: Path) -> None:
    """Relative paths in the file are taken from the config file's folder, not the cwd."""
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    path = write(
        conf_dir,
        '[watch]\npaths = ["inbox", "../drop"]\n[ledger]\npath = "state/ledger.jsonl"\n'
        '[pipeline]\ndone_dir = "done"\n',
    )
    settings = load_settings(path)
    assert settings.watch.paths == (conf_dir / "inbox", tmp_path / "drop")
    assert settings.ledger.path == conf_dir / "state" / "ledger.jsonl"
    assert settings.pipeline.done_dir == conf_dir / "done"


def test_relative_paths_without_file_resolve_against_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a config file, relative paths are taken from the current directory."""
    monkeypatch.chdir(tmp_path)
    settings = parse_settings({"watch": {"paths": ["in"]}})
    assert settings.watch.paths == (Path.cwd() / "in",)


def test_tilde_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A leading ~ in a path means the home folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = parse_settings({"ledger": {"path": "~/l.jsonl"}}, Path("/etc/x.toml"))
    assert settings.ledger.path == tmp_path / "l.jsonl"


def test_empty_optional_path_means_unset() -> None:
    """An empty string for an optional path means "not set"."""
    assert parse_settings({"api": {"api_key_file": ""}}).api.api_key_file is None


# --- URLs ---------------------------------------------------------------------------------


def test_http_base_url_refused() -> None:
    """A plain-http API URL to a remote host is refused, saying how to allow it."""
    msg = error_of({"api": {"base_url": "http://api.example.com/v2"}})
    assert msg.startswith('cfg.toml: api.base_url = "http://api.example.com/v2" uses plain http')
    assert "loopback" in msg
    assert "api.allow_insecure_http = true" in msg


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080", "http://127.9.9.9/x", "http://[::1]:9000", "http://localhost"]
)
def test_http_loopback_allowed(url: str) -> None:
    """Plain http to a loopback host (the local sandbox) is allowed."""
    settings = parse_settings({"api": {"base_url": url}, "s3": {"endpoint_url": url}})
    assert settings.api.base_url == url
    assert settings.s3.endpoint_url == url


def test_http_allowed_with_allow_insecure_http() -> None:
    """allow_insecure_http = true in the same section lets a remote http URL through."""
    settings = parse_settings(
        {"s3": {"endpoint_url": "http://minio.lan:9000", "allow_insecure_http": True}}
    )
    assert settings.s3.endpoint_url == "http://minio.lan:9000"
    # The api section's flag does not open the s3 section.
    msg = error_of(
        {"api": {"allow_insecure_http": True}, "s3": {"endpoint_url": "http://minio.lan:9000"}}
    )
    assert "s3.allow_insecure_http = true" in msg


@pytest.mark.parametrize("url", ["ftp://example.com", "https://", "example.com", "file:///x"])
def test_non_http_url_refused(url: str) -> None:
    """URLs that are not http(s) with a host are refused."""
    msg = error_of({"s3": {"accelerate_endpoint_url": url}})
    assert msg.startswith("cfg.toml: s3.accelerate_endpoint_url = ")
    assert "http(s)" in msg


def test_empty_s3_endpoint_allowed() -> None:
    """An empty s3.endpoint_url means "use the host the token names"."""
    assert parse_settings({"s3": {"endpoint_url": ""}}).s3.endpoint_url == ""


def test_base_url_trailing_slash_stripped() -> None:
    """A trailing slash on api.base_url is dropped so paths join cleanly."""
    settings = parse_settings({"api": {"base_url": "https://api.example.com/v2/openapi/"}})
    assert settings.api.base_url == "https://api.example.com/v2/openapi"


def test_base_url_default_follows_protocol() -> None:
    """Choosing protocol v3 without a base_url points at the v3 API; v2-sts at the v2 API."""
    assert parse_settings({"api": {"protocol": "v3"}}).api.base_url == (
        "https://openapi.tripo3d.ai/v3"
    )
    assert parse_settings({"api": {"protocol": "v2-sts"}}).api.base_url == (
        "https://api.tripo3d.ai/v2/openapi"
    )
    explicit = parse_settings({"api": {"protocol": "v3", "base_url": "https://x.example/v3"}})
    assert explicit.api.base_url == "https://x.example/v3"


# --- API key ------------------------------------------------------------------------------


def key_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text, encoding="utf-8")
    os.chmod(path, mode)
    return path


def test_key_lookup_order(tmp_path: Path) -> None:
    """The systemd credential wins over api.api_key_file, which wins over $TRIPO_API_KEY."""
    creds = tmp_path / "creds"
    creds.mkdir()
    key_file(creds / "tripo-api-key", "tsk_cred\n")
    api = ApiSettings(api_key_file=key_file(tmp_path / "key", "tsk_file\n"))
    env = {"CREDENTIALS_DIRECTORY": str(creds), "TRIPO_API_KEY": "tsk_env"}

    def found(api: ApiSettings, env: dict[str, str]) -> str | None:
        key = load_api_key(api, env)
        return key.reveal() if key is not None else None

    assert found(api, env) == "tsk_cred"
    (creds / "tripo-api-key").unlink()
    assert found(api, env) == "tsk_file"
    assert found(ApiSettings(), env) == "tsk_env"
    assert found(ApiSettings(), {}) is None


def test_credentials_directory_without_our_file_is_skipped(tmp_path: Path) -> None:
    """A credentials directory without tripo-api-key falls through to the next source."""
    key = load_api_key(
        ApiSettings(), {"CREDENTIALS_DIRECTORY": str(tmp_path), "TRIPO_API_KEY": "k"}
    )
    assert key is not None and key.reveal() == "k"


def test_key_whitespace_stripped_and_empty_is_none(tmp_path: Path) -> None:
    """Surrounding whitespace is ignored and an empty key counts as no key."""
    api = ApiSettings(api_key_file=key_file(tmp_path / "key", "  \n"))
    assert load_api_key(api, {}) is None
    assert load_api_key(api, {"TRIPO_API_KEY": " tsk_x \n"}) is not None
    assert load_api_key(ApiSettings(), {"TRIPO_API_KEY": "   "}) is None


def test_key_file_readable_by_others_refused(tmp_path: Path) -> None:
    """A key file readable by group or others is refused with the chmod that fixes it."""
    path = key_file(tmp_path / "key", "tsk_secret_value", 0o640)
    with pytest.raises(ConfigError) as exc:
        load_api_key(ApiSettings(api_key_file=path), {})
    assert f"chmod 600 {path}" in exc.value.message
    assert "tsk_secret_value" not in exc.value.message


def test_missing_configured_key_file_is_an_error(tmp_path: Path) -> None:
    """A configured api_key_file that does not exist is an error naming the path."""
    path = tmp_path / "absent"
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_api_key(ApiSettings(api_key_file=path), {"TRIPO_API_KEY": "tsk_env"})


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_key_file_is_an_error(tmp_path: Path) -> None:
    """A configured key file that cannot be read is an error naming the path."""
    path = key_file(tmp_path / "key", "tsk_x", 0o000)
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_api_key(ApiSettings(api_key_file=path), {})


def test_key_with_inner_whitespace_refused_without_echo(tmp_path: Path) -> None:
    """A key with a line break inside is refused and the message never shows the key."""
    path = key_file(tmp_path / "key", "tsk_part_one\ntsk_part_two\n")
    with pytest.raises(ConfigError) as exc:
        load_api_key(ApiSettings(api_key_file=path), {})
    assert "tsk_part" not in exc.value.message


def test_key_is_hidden_in_repr(tmp_path: Path) -> None:
    """The key comes back as a Secret whose repr does not show it."""
    key = load_api_key(ApiSettings(), {"TRIPO_API_KEY": "tsk_visible"})
    assert key is not None
    assert "tsk_visible" not in repr(key)


def test_api_key_help_names_every_place() -> None:
    """The "no API key" help names the systemd credential, the config key and the variable."""
    text = api_key_help()
    for place in ("CREDENTIALS_DIRECTORY", "tripo-api-key", "api.api_key_file", "TRIPO_API_KEY"):
        assert place in text


def test_key_path_through_a_file_is_an_error(tmp_path: Path) -> None:
    """A configured key path that cannot be opened (even as root) is an error naming the path."""
    path = tmp_path / "not-a-dir" / "key"
    path.parent.write_text("x", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_api_key(ApiSettings(api_key_file=path), {})


@pytest.mark.parametrize(
    ("section", "key"),
    [("ledger", "path"), ("pipeline", "done_dir"), ("pipeline", "rejected_dir")],
)
def test_daemon_output_inside_a_watched_folder_is_refused(tmp_path: Path, section, key) -> None:
    """A ledger, done_dir or rejected_dir inside watch.paths is refused: it would upload itself."""
    inbox = tmp_path / "inbox"
    value = str(inbox / "state" / "ledger.jsonl") if key == "path" else str(inbox / "done")
    with pytest.raises(ConfigError) as caught:
        parse_settings({"watch": {"paths": [str(inbox)]}, section: {key: value}}, None)
    assert f"{section}.{key}" in str(caught.value) and "inside the watched folder" in str(
        caught.value
    )


def test_ledger_defaults_to_systemds_state_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under systemd's StateDirectory= the ledger goes there without any config."""
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/tripo-watchd")
    assert Settings().ledger.path == Path("/var/lib/tripo-watchd/ledger.jsonl")


def test_config_and_key_are_found_in_the_users_config_dir(tmp_path: Path) -> None:
    """With no --config, ~/.config/tripo-watchd/config.toml and its api-key file are used."""
    from tripo_watchd.config import default_config_path

    home = tmp_path / "xdg" / "tripo-watchd"
    home.mkdir(parents=True)
    environ = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert default_config_path(environ) in (None, Path("/etc/tripo-watchd/config.toml"))
    (home / "config.toml").write_text("[workers]\ncount = 2\n")
    assert default_config_path(environ) == home / "config.toml"
    (home / "api-key").write_text("tsk_personal\n")
    (home / "api-key").chmod(0o600)
    key = load_api_key(ApiSettings(), environ)
    assert key is not None and key.reveal() == "tsk_personal"
