"""The authorization code grant with PKCE (RFC 7636, S256) and a loopback redirect (RFC 8252 §7.3).

Owns: the code verifier and challenge, the `state` value, the one-shot
callback server on 127.0.0.1 (a free port or the one given), the
authorization URL, checking what the browser brings back, and exchanging
the code. A redirect whose `state` is not this login's is answered 400 and
ignored (the login keeps waiting: a stray or forged request must not end
it). Knows nothing of terminals or the state file. The code, the verifier
and the tokens are never shown.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
from collections.abc import Awaitable, Callable
from html import escape
from urllib.parse import urlencode

from aiohttp import web

from ...core.errors import GrantError
from ..endpoint import TokenEndpoint
from ..protocol import TokenResponse
from .prompt import LoginError, Prompt

CALLBACK_PATH = "/callback"
# Lines for the browser's page, by outcome.
_PAGE = "<!doctype html><title>tokenproxy login</title><p>{}</p>"


def pkce_pair() -> tuple[str, str]:
    """A fresh code verifier (64 URL-safe characters, §4.1) and its S256 challenge (§4.2)."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def authorization_url(endpoint: str, params: dict[str, str]) -> str:
    """The authorization endpoint with the request's parameters added to any it already has."""
    return endpoint + ("&" if "?" in endpoint else "?") + urlencode(params)


def _page(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=_PAGE.format(escape(text)), content_type="text/html")


class Callback:
    """The loopback redirect's one answer: the code when `state` matches, or the server's error."""

    def __init__(self, state: str, prompt: Prompt, issuer: str = "") -> None:
        self._state = state
        self._prompt = prompt
        self._issuer = issuer  # when known, an `iss` in the answer must name it (RFC 9207: no mix-up)
        self.code: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def handle(self, request: web.Request) -> web.Response:
        """Take the first answer whose state matches; answer the browser with a page saying what happened."""
        query = request.query
        if query.get("state") != self._state:
            self._prompt.line("a request reached the callback with a state that is not this login's: ignored")
            return _page(400, "This answer is not for the login under way (its state does not match). "
                              "Nothing was done; go back to the terminal.")
        if self.code.done():
            return _page(400, "This login has already had its answer. You may close this page.")
        iss = query.get("iss")
        if self._issuer and iss is not None and iss != self._issuer:
            self.code.set_exception(LoginError(f"the answer came from issuer {iss!r}, not {self._issuer!r} (RFC 9207)"))
            return _page(400, "This answer names another authorization server. Nothing was done.")
        error = query.get("error")
        if error:
            self.code.set_exception(LoginError(f"the authorization server refused the login ({error})"))
            return _page(200, f"The login was refused ({error}). You may close this page.")
        code = query.get("code")
        if not code:
            self.code.set_exception(LoginError("the redirect to the callback carried no code"))
            return _page(400, "The answer carried no code. You may close this page.")
        self.code.set_result(code)
        return _page(200, "tokenproxy: you are logged in. You may close this page.")


async def browser_login(
    endpoint: TokenEndpoint,
    authorize_url: str,
    client_id: str,
    fields: dict[str, str],
    prompt: Prompt,
    *,
    port: int,
    timeout: float,
    open_browser: Callable[[str], Awaitable[bool]] | None,
    issuer: str = "",
) -> TokenResponse:
    """Log in through a browser: listen on 127.0.0.1, show (and open) the authorization URL, wait at most
    `timeout` seconds for the redirect, exchange its code with the PKCE verifier.

    The callback server is closed before this returns, however it ends
    (cancelled by Ctrl-C included). With `issuer` (from discovery), an answer
    naming another one in `iss` ends the login.
    """
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(16)
    callback = Callback(state, prompt, issuer)
    app = web.Application()
    app.router.add_get(CALLBACK_PATH, callback.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", port)
        try:
            await site.start()
        except OSError as exc:
            raise LoginError(f"cannot listen on 127.0.0.1:{port} for the redirect ({exc.strerror})") from None
        bound = runner.addresses[0][1]
        redirect_uri = f"http://127.0.0.1:{bound}{CALLBACK_PATH}"
        url = authorization_url(
            authorize_url,
            {
                "response_type": "code",
                "client_id": client_id,
                "redirect_uri": redirect_uri,
                **fields,
                "state": state,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            },
        )
        prompt.line("To log in, open this URL in a browser on this machine:")
        prompt.line(url)
        if open_browser is not None and await open_browser(url):
            prompt.line("(a browser was opened for you)")
        prompt.status(f"waiting for the browser (at most {timeout:g} s) ...")
        try:
            code = await asyncio.wait_for(asyncio.shield(callback.code), timeout)
        except asyncio.TimeoutError:
            raise LoginError(f"no answer from the browser within {timeout:g} s (--timeout)") from None
        finally:
            prompt.done()
    finally:
        await runner.cleanup()
        if not callback.code.done():
            callback.code.cancel()
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri, "code_verifier": verifier}
    try:
        return await endpoint.request(form, spends_refresh_token=False)
    except GrantError as error:
        raise LoginError(f"exchanging the code failed: {error}") from None
