module tortie.dev/frontend

go 1.19
