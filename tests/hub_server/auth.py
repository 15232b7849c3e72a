"""Who is asking and what they may touch: bearer tokens, private and missing repos, write rights, revisions.
Shared by the read and write routes; every refusal is a HubError with the status the real Hub answers."""

from __future__ import annotations

from typing import Any

from .errors import HubError
from .storage import Repo
from .transport import BaseHandler

__all__ = ["AuthHandler"]


class AuthHandler(BaseHandler):
    """Request helpers that look up the caller's token, the repo it names and the revision it asks for."""

    def _token(self) -> str | None:
        """The bearer token, or None; an unknown token is refused everywhere, as the Hub does."""
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not self.hub.known_token(token):
            # This exact message makes huggingface_hub raise a plain HfHubHTTPError (401), not RepositoryNotFound.
            raise HubError(401, "Invalid credentials in Authorization header")
        return token

    def _require_write(self, token: str | None, namespace: str) -> None:
        if token is None:
            raise HubError(401, "You must be authenticated (Authorization: Bearer <token>) to write to the Hub")
        if not self.hub.can_write(token, namespace):
            raise HubError(403, f"You don't have the rights to write to the namespace '{namespace}'", "Forbidden")

    def _visible_repo(self, repo_type: str, repo_id: str, token: str | None) -> tuple[Repo, dict[str, Any]]:
        repo = self.store.repo(repo_type, repo_id)
        meta = self.store.meta(repo)
        # Private repos of other namespaces look missing (404, not 403), like on the real Hub.
        if meta is None or (meta["private"] and not (token and self.hub.can_write(token, repo.namespace))):
            raise HubError(404, f"Repository not found: {repo_type} '{repo_id}'", "RepoNotFound")
        return repo, meta

    def _resolve(self, repo: Repo, revision: str) -> str:
        cid = self.store.resolve(repo, revision)
        if cid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return cid

    def _writer(self, repo_type: str, repo_id: str, create_pr: bool) -> tuple[Repo, str]:
        """Auth for commit-like calls. Like the Hub, any valid token may open a pull request on a repo it can see."""
        token = self._token()
        if token is None:
            raise HubError(401, "You must be authenticated (Authorization: Bearer <token>) to write to the Hub")
        repo, _ = self._visible_repo(repo_type, repo_id, token)
        if not create_pr:
            self._require_write(token, repo.namespace)
        return repo, token
