"""Entry points shaped like other tools' APIs, backed by diffquant artifacts (`quark`: AMD Quark's)."""
