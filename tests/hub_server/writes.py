"""Write routes of the test Hub: create/delete repos, settings, preupload, LFS batch and upload, commits, refs.
Commits apply the client's NDJSON operations on top of a branch or PR head, under the store's lock."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from typing import Any

from .auth import AuthHandler
from .errors import HubError
from .lfs import SHA256, is_lfs, lfs_patterns, lfs_pointer
from .storage import HEX40, PR_REF, URL_PREFIX, Repo, Store, git_blob_oid, valid_repo_path

__all__ = ["WriteRoutes"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_BRANCH = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")


class WriteRoutes(AuthHandler):
    """Handlers of the endpoints that change repos; each answers exactly once."""

    # -- account / repos --
    def _repo_from_payload(self, token: str | None) -> Repo:
        body = self._json_body()
        name, organization = body.get("name"), body.get("organization")
        repo_type = body.get("type") or "model"
        if repo_type not in URL_PREFIX:
            raise HubError(400, f"Unsupported repo type '{repo_type}'")
        if token is None:
            raise HubError(401, "You must be authenticated (Authorization: Bearer <token>) to write to the Hub")
        namespace = organization or self.hub.user_name(token)
        for part in (namespace, name):
            if not isinstance(part, str) or not _NAME.fullmatch(part) or "--" in part or ".." in part \
                    or part.endswith(".git"):
                raise HubError(400, f"Invalid repo name: {namespace}/{name}")
        return self.store.repo(repo_type, f"{namespace}/{name}")

    def _create_repo(self) -> None:
        token = self._token()
        repo = self._repo_from_payload(token)
        self._require_write(token, repo.namespace)
        body = self._json_body()
        private = body.get("visibility") == "private" if "visibility" in body else bool(body.get("private"))
        url = f"{self._base_url()}/{repo.url_path}"
        with self.store.lock:
            if self.store.meta(repo) is not None:
                # exist_ok=True reads "url" from this 409 body.
                raise HubError(409, f"You already created this {repo.type} repo", extra={"url": url})
            self.store.create_repo(repo, private)
        self._send_json({"url": url, "name": repo.id, "id": repo.id})

    def _delete_repo(self) -> None:
        token = self._token()
        repo = self._repo_from_payload(token)
        self._visible_repo(repo.type, repo.id, token)
        self._require_write(token, repo.namespace)
        with self.store.lock:
            trash = self.store.temp_path()
            os.replace(repo.dir, trash)  # atomic for readers; the content is removed below
        shutil.rmtree(trash, ignore_errors=True)
        self._send(200, b"")

    def _settings(self, repo_type: str, repo_id: str) -> None:
        token = self._token()
        repo, meta = self._visible_repo(repo_type, repo_id, token)
        self._require_write(token, repo.namespace)
        body = self._json_body()
        with self.store.lock:
            meta = self.store.meta(repo) or meta
            if "visibility" in body:
                meta["private"] = body["visibility"] == "private"
            elif "private" in body:
                meta["private"] = bool(body["private"])
            self.store.save_meta(repo, meta)
        if "gated" in body:
            self.hub.set_gated(repo_id, body["gated"] not in (False, None, "false"), repo_type=repo_type)
        self._send_json({})

    # -- writing --
    def _gitattributes_patterns(self, files: dict[str, Any]) -> list[str]:
        entry = files.get(".gitattributes")
        if entry is None:
            return []
        return lfs_patterns(self.store.read_blob(entry["sha256"]).decode("utf-8", "replace"))

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo, _ = self._writer(repo_type, repo_id, self._flag("create_pr"))
        cid = self._resolve(repo, revision)
        files: dict[str, Any] = self.store.commit(repo, cid)["files"]
        patterns = self._gitattributes_patterns(files)
        answer = []
        for item in self._json_body().get("files", []):
            path, size = item["path"], int(item["size"])
            sample = base64.b64decode(item.get("sample") or "")
            lfs = is_lfs(path, size, sample, patterns)
            existing = files.get(path)
            # With this oid the client skips re-uploading unchanged files (regular: git blob id, LFS: sha256).
            oid = None
            if existing is not None and existing["lfs"] == lfs:
                oid = existing["sha256"] if lfs else existing["oid"]
            answer.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                           "oid": oid})
        self._send_json({"files": answer, "commitOid": cid})

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        body = self._json_body()
        # The client omits "ref" when it prepares a pull request.
        repo, _ = self._writer(repo_type, repo_id, create_pr="ref" not in body)
        if body.get("operation") != "upload":
            raise HubError(400, "Only the LFS 'upload' operation is supported")
        objects = self.hub.lfs.batch(body.get("objects", []), self._base_url())
        self._send(200, json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str) -> None:
        # Like a pre-signed storage URL, this takes no token; it only accepts objects announced by a batch call.
        self.hub.lfs.receive(oid, self._iter_body())
        self._send(200, b"")

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        create_pr = self._flag("create_pr")
        repo, token = self._writer(repo_type, repo_id, create_pr)
        try:
            lines = [json.loads(line) for line in self._body.splitlines() if line.strip()]
        except ValueError:
            raise HubError(400, "Commit payload is not valid NDJSON") from None
        header = next((line["value"] for line in lines if line.get("key") == "header"), None)
        if not header or not header.get("summary"):
            raise HubError(400, "The commit needs a header line with a non-empty summary")
        parent_commit: str | None = header.get("parentCommit")
        with self.store.lock:
            refs = self.store.refs(repo)
            pr_match = PR_REF.fullmatch(revision)
            branch = revision[len("refs/heads/"):] if revision.startswith("refs/heads/") else revision
            if pr_match and not create_pr and pr_match[1] in refs["prs"]:
                kind, name = "prs", pr_match[1]
            elif branch in refs["branches"]:
                kind, name = "branches", branch
            else:
                raise HubError(404, f"Invalid rev id: {revision} (commits go to a branch or an open PR)",
                               "RevisionNotFound")
            head = refs[kind][name]
            base = head
            if parent_commit is not None:
                if create_pr:
                    base = self._resolve(repo, parent_commit)
                elif not head.startswith(parent_commit):
                    raise HubError(412, f"A commit has happened since {parent_commit}; refresh and try again")
            files = dict(self.store.commit(repo, base)["files"])
            for line in lines:
                self._apply(files, line)
            cid = self.store.write_commit(repo, base, files, header["summary"], header.get("description") or "",
                                          self.hub.user_name(token))
            pr_url = None
            if create_pr:
                number = str(max((int(n) for n in refs["prs"]), default=0) + 1)
                refs["prs"][number] = cid
                pr_url = f"{self._base_url()}/{repo.url_path}/discussions/{number}"
            else:
                refs[kind][name] = cid
            self.store.save_refs(repo, refs)
        self._send_json({"success": True, "commitOid": cid, "hookOutput": "", "pullRequestUrl": pr_url,
                         "commitUrl": f"{self._base_url()}/{repo.url_path}/commit/{cid}"})

    def _apply(self, files: dict[str, Any], line: dict[str, Any]) -> None:
        key, value = line.get("key"), line.get("value") or {}
        if key == "header":
            return
        path = str(value.get("path", "")).strip("/") if key == "deletedFolder" else value.get("path", "")
        if not isinstance(path, str) or not valid_repo_path(path):
            raise HubError(400, f"Invalid path in commit: {path!r}")
        if key == "file":
            content = str(value.get("content", ""))
            data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
            files[path] = Store.file_entry(self.store.put_bytes(data), len(data), git_blob_oid(data), lfs=False)
        elif key == "lfsFile":
            oid = str(value.get("oid", ""))
            size = self.store.blob_size(oid) if SHA256.fullmatch(oid) else None
            if size is None or ("size" in value and value["size"] != size):
                raise HubError(400, f"LFS object {oid} for '{path}' was never uploaded")
            files[path] = Store.file_entry(oid, size, git_blob_oid(lfs_pointer(oid, size)), lfs=True)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            doomed = [p for p in files if p.startswith(path + "/")]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in doomed:
                del files[p]
        else:
            raise HubError(400, f"Unsupported commit operation '{key}'")

    def _create_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        repo, _ = self._writer(repo_type, repo_id, create_pr=False)
        if not _BRANCH.fullmatch(branch) or branch.startswith("refs/") or HEX40.fullmatch(branch):
            raise HubError(400, f"Invalid branch name: {branch}")
        starting_point = self._json_body().get("startingPoint") or "main"
        with self.store.lock:
            cid = self._resolve(repo, starting_point)
            refs = self.store.refs(repo)
            if branch in refs["branches"]:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            refs["branches"][branch] = cid
            self.store.save_refs(repo, refs)
        self._send_json({})

    def _create_tag(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo, _ = self._writer(repo_type, repo_id, create_pr=False)
        tag = self._json_body().get("tag")
        if not isinstance(tag, str) or not _BRANCH.fullmatch(tag) or tag.startswith("refs/"):
            raise HubError(400, f"Invalid tag name: {tag}")
        with self.store.lock:
            cid = self._resolve(repo, revision)
            refs = self.store.refs(repo)
            if tag in refs["tags"]:
                raise HubError(409, f"Reference already exists: refs/tags/{tag}")
            refs["tags"][tag] = cid
            self.store.save_refs(repo, refs)
        self._send_json({})

    def _delete_ref(self, repo_type: str, repo_id: str, kind: str, name: str) -> None:
        repo, _ = self._writer(repo_type, repo_id, create_pr=False)
        if kind == "branches" and name == "main":
            raise HubError(403, "The default branch 'main' cannot be deleted")
        with self.store.lock:
            refs = self.store.refs(repo)
            if refs[kind].pop(name, None) is None:
                raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
            self.store.save_refs(repo, refs)
        self._send(200, b"")


