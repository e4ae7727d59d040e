from shardstream.server.cli import main

raise SystemExit(main())
