from mpswatch.cli import main

raise SystemExit(main())
