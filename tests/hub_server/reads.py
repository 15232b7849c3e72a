"""Read routes of the test Hub: whoami, repo info, tree and paths-info listings, refs, commits, file downloads.
Downloads honour one HTTP Range (206 Partial Content), as the Hub's resolve URLs and their CDN do."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any
from urllib.parse import parse_qs

from .auth import AuthHandler
from .errors import HubError
from .lfs import LFS_SIZE_THRESHOLD, lfs_pointer
from .storage import Repo, now
from .transport import CHUNK

__all__ = ["ReadRoutes"]


class ReadRoutes(AuthHandler):
    """Handlers of the GET/HEAD endpoints (and POST paths-info, a read); each answers exactly once."""

    # -- account --
    def _whoami(self) -> None:
        token = self._token()
        if token is None:
            raise HubError(401, "You must be authenticated to call whoami")
        name = self.hub.user_name(token)
        namespaces = self.hub.namespaces(token)
        orgs = sorted(namespaces - {name}) if namespaces is not None else []
        role = "write" if namespaces is None or namespaces else "read"
        self._send_json({
            "type": "user", "id": hashlib.sha1(token.encode()).hexdigest()[:24], "name": name, "fullname": name,
            "email": None, "emailVerified": False, "canPay": False, "isPro": False, "periodEnd": None,
            "avatarUrl": "", "orgs": [{"type": "org", "name": org, "fullname": org, "roleInOrg": "admin"}
                                      for org in orgs],
            "auth": {"type": "access_token",
                     "accessToken": {"displayName": "hub_server token", "role": role, "createdAt": now()}},
        })

    # -- reading --
    def _info(self, repo_type: str, repo_id: str, revision: str | None) -> None:
        token = self._token()
        repo, meta = self._visible_repo(repo_type, repo_id, token)
        cid = self._resolve(repo, revision or "main")
        commit = self.store.commit(repo, cid)
        files: dict[str, Any] = commit["files"]
        with_blobs = self._flag("blobs")
        siblings = []
        for path in sorted(files):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                entry = files[path]
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if entry["lfs"]:
                    sibling["lfs"] = {"size": entry["size"], "sha256": entry["sha256"],
                                      "pointerSize": len(lfs_pointer(entry["sha256"], entry["size"]))}
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": meta["_id"], "id": repo.id, "author": repo.namespace, "sha": cid,
            "lastModified": commit["date"], "createdAt": meta["createdAt"], "private": meta["private"],
            "gated": "auto" if self.hub.is_gated(repo_type, repo_id) else False, "disabled": False,
            "downloads": 0, "likes": 0, "tags": [], "siblings": siblings, "spaces": [],
            "usedStorage": sum(entry["size"] for entry in files.values()),
        }
        if repo_type == "model":
            info["modelId"] = repo.id
            config = self._config_summary(files)
            if config is not None:
                info["config"] = config
        self._send_json(info)

    def _config_summary(self, files: dict[str, Any]) -> dict[str, Any] | None:
        # The Hub reports a few config.json fields in model_info; tools use them to guess the architecture.
        entry = files.get("config.json")
        if entry is None or entry["size"] > LFS_SIZE_THRESHOLD:
            return None
        try:
            config = json.loads(self.store.read_blob(entry["sha256"]))
        except ValueError:
            return None
        if not isinstance(config, dict):
            return None
        return {key: config[key] for key in ("architectures", "model_type") if key in config}

    def _entries(self, repo: Repo, cid: str, expand: bool, paths: list[str]) -> list[dict[str, Any]]:
        files: dict[str, Any] = self.store.commit(repo, cid)["files"]
        out = []
        for path in paths:
            if path in files:
                entry = files[path]
                item: dict[str, Any] = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
                if entry["lfs"]:
                    item["lfs"] = {"oid": entry["sha256"], "size": entry["size"],
                                   "pointerSize": len(lfs_pointer(entry["sha256"], entry["size"]))}
            else:
                item = {"type": "directory", "oid": self._tree_oid(files, path), "size": 0, "path": path}
            if expand:
                item["lastCommit"] = self._last_commit(repo, cid, path)
            out.append(item)
        return out

    @staticmethod
    def _under(files: dict[str, Any], folder: str) -> dict[str, str]:
        prefix = folder + "/"
        return {path: entry["oid"] for path, entry in files.items() if path.startswith(prefix)}

    def _tree_oid(self, files: dict[str, Any], folder: str) -> str:
        return hashlib.sha1(json.dumps(sorted(self._under(files, folder).items())).encode()).hexdigest()

    def _last_commit(self, repo: Repo, cid: str, path: str) -> dict[str, str]:
        def state(commit: dict[str, Any]) -> Any:
            files = commit["files"]
            return files[path]["oid"] if path in files else self._under(files, path)

        history = list(self.store.history(repo, cid))
        last = history[0]
        for older in history[1:]:
            if state(older) != state(last):
                break
            last = older
        return {"id": last["id"], "title": last["summary"], "date": last["date"]}

    def _tree(self, repo_type: str, repo_id: str, revision: str, folder: str) -> None:
        token = self._token()
        repo, _ = self._visible_repo(repo_type, repo_id, token)
        cid = self._resolve(repo, revision)
        files: dict[str, Any] = self.store.commit(repo, cid)["files"]
        recursive = self._flag("recursive")
        expand = self._flag("expand")
        folder = folder.strip("/")
        prefix = f"{folder}/" if folder else ""
        if folder and not self._under(files, folder):
            raise HubError(404, f"Folder '{folder}' not found at revision {revision}", "EntryNotFound",
                           headers={"X-Repo-Commit": cid})
        paths: set[str] = set()
        for path in files:
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            if recursive:
                paths.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts) + 1))
            else:
                paths.add(prefix + parts[0])
        # One page: huggingface_hub only follows a `Link: <...>; rel="next"` header, which is never sent.
        self._send_json(self._entries(repo, cid, expand, sorted(paths)))

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        token = self._token()
        repo, _ = self._visible_repo(repo_type, repo_id, token)
        cid = self._resolve(repo, revision)
        files: dict[str, Any] = self.store.commit(repo, cid)["files"]
        # `HfApi.get_paths_info` posts a form: paths=a&paths=b&expand=False.
        form = parse_qs(self._body.decode(), keep_blank_values=True)
        wanted, expand = form.get("paths", []), form.get("expand", ["false"])[0].lower() == "true"
        existing = [p.strip("/") for p in wanted if p.strip("/") in files or self._under(files, p.strip("/"))]
        self._send_json(self._entries(repo, cid, expand, existing))

    def _refs(self, repo_type: str, repo_id: str) -> None:
        token = self._token()
        repo, _ = self._visible_repo(repo_type, repo_id, token)
        refs = self.store.refs(repo)

        def listing(kind: str, prefix: str) -> list[dict[str, str]]:
            return [{"name": name, "ref": f"{prefix}{name}", "targetCommit": cid}
                    for name, cid in sorted(refs[kind].items())]

        data: dict[str, Any] = {"branches": listing("branches", "refs/heads/"), "converts": [],
                                "tags": listing("tags", "refs/tags/")}
        if self._query.get("include_prs"):
            data["pullRequests"] = listing("prs", "refs/pr/")
        self._send_json(data)

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        token = self._token()
        repo, _ = self._visible_repo(repo_type, repo_id, token)
        cid = self._resolve(repo, revision)
        self._send_json([
            {"id": c["id"], "title": c["summary"], "message": c["description"], "date": c["date"],
             "authors": [{"user": c["author"]}]}
            for c in self.store.history(repo, cid)
        ])

    def _discussions(self, repo_type: str, repo_id: str) -> None:
        token = self._token()
        self._visible_repo(repo_type, repo_id, token)
        self._send_json({"discussions": [], "count": 0, "start": 0, "numClosedDiscussions": 0})

    def _resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        token = self._token()
        repo, _ = self._visible_repo(repo_type, repo_id, token)
        if self.hub.is_gated(repo_type, repo_id):
            raise HubError(403, f"Access to {repo_type} {repo_id} is restricted. You must have access to it and be "
                                "authenticated to access it.", "GatedRepo")
        cid = self._resolve(repo, revision)
        entry = self.store.commit(repo, cid)["files"].get(path)
        if entry is None:
            # X-Repo-Commit lets the client cache the file's absence for this commit.
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": cid})
        size: int = entry["size"]
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", "X-Repo-Commit": cid}
        if entry["lfs"]:
            # The client names cached blobs after the linked etag: the sha256 for LFS files.
            headers.update({"ETag": f'"{entry["sha256"]}"', "X-Linked-Etag": f'"{entry["sha256"]}"',
                            "X-Linked-Size": str(size)})
        else:
            headers["ETag"] = f'"{entry["oid"]}"'
        start, end, status = 0, size - 1, 200
        byte_range = self._parse_range(self.headers.get("Range"), size)
        if byte_range == "unsatisfiable":
            raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
        if byte_range is not None:
            start, end = byte_range
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(end - start + 1, 0)
        self._send_headers(status, headers, length)
        if self.command == "HEAD" or length == 0:
            return
        with open(self.store.blob_path(entry["sha256"]), "rb") as blob:
            blob.seek(start)
            remaining = length
            while remaining:
                chunk = blob.read(min(remaining, CHUNK))
                if not chunk:
                    raise RuntimeError(f"blob {entry['sha256']} is shorter than recorded")
                self.wfile.write(chunk)
                remaining -= len(chunk)

    @staticmethod
    def _parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
        """One `bytes=a-b`, `bytes=a-` or `bytes=-n` range; anything else is ignored (full answer)."""
        match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header or "")
        if match is None or match[1] == match[2] == "":
            return None
        if match[1] == "":
            suffix = int(match[2])
            return (max(size - suffix, 0), size - 1) if suffix and size else "unsatisfiable"
        start = int(match[1])
        end = min(int(match[2]), size - 1) if match[2] else size - 1
        if start >= size or end < start:
            return "unsatisfiable"
        return start, end

