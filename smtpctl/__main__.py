from smtpctl.cli import main

main(prog="smtpctl")
