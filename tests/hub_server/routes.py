"""URL routing of the test Hub: which handler method answers each method and path, as huggingface_hub calls them.
`Handler` joins the read and write routes; its `_dispatch` parses the URL and turns errors into answers."""

from __future__ import annotations

import traceback
from urllib.parse import parse_qs, unquote

from .errors import HubError
from .lfs import LFS_PATH
from .reads import ReadRoutes
from .writes import WriteRoutes

__all__ = ["Handler"]

# URL segment after /api/ -> repo type.
_API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


class Handler(ReadRoutes, WriteRoutes):
    """The request handler HubServer serves with: one HTTP/1.1 keep-alive connection."""

    def _dispatch(self) -> None:
        raw_path, _, query = self.path.partition("?")
        self._query = parse_qs(query, keep_blank_values=True)
        # Split before unquoting: revisions arrive quoted as one segment (refs%2Fpr%2F1).
        segments = [unquote(part) for part in raw_path.split("/")[1:]]
        try:
            if self.command == "PUT" and raw_path.startswith(f"/{LFS_PATH}/"):
                self._lfs_put(segments[-1])  # streams its (large) body to disk itself
            else:
                self._body = self._read_body()
                self._route(segments)
        except HubError as err:
            self._drain()
            self._send_error(err)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as exc:  # a bug in this server: report it fast and loud, never as a (retried) 5xx
            self.hub.errors.append(traceback.format_exc())
            traceback.print_exc()
            self.close_connection = True  # the request stream may be out of step: start afresh
            if not self._headers_sent:
                self._send_error(HubError(400, f"hub_server internal error: {exc!r}", "HubServerBug",
                                          headers={"Connection": "close"}))

    # -- routing --
    def _route(self, seg: list[str]) -> None:
        method = self.command
        if seg[:1] == ["api"]:
            return self._route_api(method, seg[1:])
        # /{datasets/|spaces/}ns/name/resolve/{rev}/{path...}
        repo_type, rest = ("model", seg)
        if seg and seg[0] in _API_TYPES and seg[0] != "models" and len(seg) > 3:
            repo_type, rest = _API_TYPES[seg[0]], seg[1:]
        if len(rest) >= 5 and rest[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve_file(repo_type, f"{rest[0]}/{rest[1]}", rest[3], "/".join(rest[4:]))
        # /{datasets/|spaces/}ns/name.git/info/lfs/objects/batch
        if len(rest) == 6 and rest[1].endswith(".git") and rest[2:] == ["info", "lfs", "objects", "batch"]:
            if method == "POST":
                return self._lfs_batch(repo_type, f"{rest[0]}/{rest[1][:-4]}")
        raise HubError(404, f"Not found: {method} {self.path}")

    def _route_api(self, method: str, seg: list[str]) -> None:
        if seg == ["whoami-v2"] and method == "GET":
            return self._whoami()
        if seg == ["validate-yaml"] and method == "POST":
            return self._send_json({"errors": [], "warnings": []})
        if seg == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if seg == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo()
        if len(seg) >= 3 and seg[0] in _API_TYPES:
            return self._route_repo_api(method, _API_TYPES[seg[0]], f"{seg[1]}/{seg[2]}", seg[3:])
        raise HubError(404, f"Not found: {method} {self.path}")

    def _route_repo_api(self, method: str, repo_type: str, repo_id: str, rest: list[str]) -> None:
        """/api/{type}s/{ns}/{name}/{action}/{arg...}; `arg` is a revision (or branch) possibly followed by a path."""
        action = rest[0] if rest else ""
        arg = "/".join(rest[1:])
        if method == "GET" and not rest:
            return self._info(repo_type, repo_id, None)
        if method == "GET" and action == "refs":
            return self._refs(repo_type, repo_id)
        if method == "GET" and action == "discussions":
            return self._discussions(repo_type, repo_id)
        if method == "PUT" and action == "settings":
            return self._settings(repo_type, repo_id)
        if action.startswith("xet-"):
            raise HubError(400, "This test Hub does not speak Xet: set HF_HUB_DISABLE_XET=1 before importing "
                                "huggingface_hub")
        if arg:
            revision = rest[1]
            if method == "GET" and action == "revision":
                return self._info(repo_type, repo_id, arg)
            if method == "GET" and action == "tree":
                return self._tree(repo_type, repo_id, revision, "/".join(rest[2:]))
            if method == "GET" and action == "commits":
                return self._commits(repo_type, repo_id, revision)
            if method == "POST" and action == "paths-info":
                return self._paths_info(repo_type, repo_id, revision)
            if method == "POST" and action == "preupload":
                return self._preupload(repo_type, repo_id, revision)
            if method == "POST" and action == "commit":
                return self._commit(repo_type, repo_id, revision)
            if method == "POST" and action == "branch":
                return self._create_branch(repo_type, repo_id, arg)
            if method == "POST" and action == "tag":
                return self._create_tag(repo_type, repo_id, arg)
            if method == "DELETE" and action in ("branch", "tag"):
                return self._delete_ref(repo_type, repo_id, "branches" if action == "branch" else "tags", arg)
        raise HubError(404, f"Not found: {method} {self.path}")
