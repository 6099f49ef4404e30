"""PostgreSQL, below everything that talks to it: URLs, engines and session settings
(`engines`), what an error says and whether it is the server's (`diagnosis`), and the bounded
retry around a transient one (`retry`).
"""
