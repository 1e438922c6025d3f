from tools.eval.evaluate import main

main()
