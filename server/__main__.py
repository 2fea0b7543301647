from heinfer_server.main import main

raise SystemExit(main())
