#!/usr/bin/env python3
"""Runs SQL statements on a current ClickHouse engine (chdb, in-process) and prints their results.

Used by tests to prove that the DDL the operator writes is accepted by a current ClickHouse, which
this machine has no server for. Usage:

    python3 scripts/chdb_sql.py SESSION_DIR FILE...

Each FILE holds one statement. Results are printed as TSV, each preceded by a line
`-- result FILE`. The first failing statement prints `ERROR FILE: <ClickHouse's message>` on stderr
and the script exits 2. Exit 3 means chdb is not installed.
"""

import sys


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 64
    try:
        from chdb import session
    except ImportError as error:
        print(
            f"chdb is not installed ({error}); install it with: python3 -m pip install chdb-core",
            file=sys.stderr,
        )
        return 3
    sess = session.Session(sys.argv[1])
    for path in sys.argv[2:]:
        with open(path, encoding="utf-8") as handle:
            statement = handle.read()
        try:
            result = sess.query(statement, "TSV")
        except Exception as error:  # chdb raises its own ChdbError with the server's message
            print(f"ERROR {path}: {error}", file=sys.stderr)
            return 2
        print(f"-- result {path}")
        sys.stdout.write(str(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
