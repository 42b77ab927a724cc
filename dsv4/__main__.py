from dsv4.cli import main

raise SystemExit(main())
