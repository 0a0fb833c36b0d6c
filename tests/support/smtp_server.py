"""A real SMTP server for keygate's alert tests: aiosmtpd with STARTTLS required and
AUTH required, one user. Each message it accepts is written to OUTDIR as N.eml, with its
envelope in N.json. It prints "ready" once listening and stops when its stdin closes.

    python smtp_server.py PORT CERT KEY OUTDIR USER PASSWORD
"""
import asyncio
import json
import pathlib
import ssl
import sys

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


def main():
    port, cert, key, outdir, user, password = sys.argv[1:7]
    out = pathlib.Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    count = {"n": 0}

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            count["n"] += 1
            n = count["n"]
            (out / f"{n}.eml").write_bytes(envelope.original_content or envelope.content)
            meta = {
                "mail_from": envelope.mail_from,
                "rcpt_tos": envelope.rcpt_tos,
                "tls": session.ssl is not None,
                "authenticated": bool(session.authenticated),
            }
            (out / f"{n}.json").write_text(json.dumps(meta))
            return "250 OK"

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode() == user
            and auth_data.password.decode() == password
        )
        return AuthResult(success=ok, handled=False)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    controller = Controller(
        Handler(),
        hostname="127.0.0.1",
        port=int(port),
        tls_context=context,
        require_starttls=True,
        authenticator=authenticator,
        auth_required=True,
    )
    controller.start()
    print("ready", flush=True)
    sys.stdin.read()
    controller.stop()


if __name__ == "__main__":
    main()
