"""Every byte that reaches disk: the spool database, its writer, migrations, body files."""
